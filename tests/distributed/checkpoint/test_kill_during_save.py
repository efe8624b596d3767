"""kill -9 at random moments while a real model and distributed optimizer are being saved
through dist_checkpointing, 5 times (KILLS): every next start resumes from a complete checkpoint
whose weights are the ones saved at its step. Each kill waits for the saver to report that a
save began and lands at a random point of it, so a slow (busy) machine only makes the test
slower. A kill of the saver alone, as of a rank, leaves none of its processes behind."""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

import psutil
import pytest

from megatron_cegppo.testing.leaks import still_running
import torch

pytestmark = pytest.mark.distributed

START_TIMEOUT_S = 300  # start-up (imports, model) takes ~6 s on an idle machine
KILLS = 5  # each lands at a random point of a save
EXIT_WITHIN_S = 5.0


def _model():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.config.schema import OptimConfig
    from megatron_cegppo.models import build_gpt_model_chunks
    from megatron_cegppo.cpu_compat import apply_cpu_compat
    from megatron_cegppo.testing.multiprocess import free_port
    from megatron_cegppo.testing.tiny import tiny_gpt_config
    from megatron_cegppo.trainer.optim import build_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    apply_cpu_compat()
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    config = tiny_gpt_config(num_layers=2, hidden_size=32, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=64)
    (model,) = build_gpt_model_chunks(config, vocab_size=64, max_sequence_length=8)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    return ddp, build_optimizer(OptimConfig(lr=1e-3), [ddp], bf16=False)


def _event(path: str, **fields) -> None:
    """One line, appended with a single write (the reader may be polling)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps({"pid": os.getpid(), "t": time.time(), **fields}) + "\n").encode())
    finally:
        os.close(fd)


def saver(root: str, report: str, events: str) -> None:
    """One 'start', run like a rank (its own session, as torchrun starts them, and the
    lifeline that ``init_distributed`` sets up in every rank): check what the store offers,
    then keep saving new steps, reporting when each save begins and ends."""
    from megatron_cegppo.checkpoint.megatron_state import load_model_and_optimizer, save_model_and_optimizer
    from megatron_cegppo.checkpoint.store import CheckpointStore
    from megatron_cegppo.lifeline import exit_with_parent

    exit_with_parent()
    ddp, opt = _model()
    store = CheckpointStore(root, keep=2)
    store.clean_staging()
    latest = store.latest()
    step, ok = 0, True
    if latest is not None:
        load_model_and_optimizer([ddp], opt, latest / "megatron")
        step = int(latest.name.split("_")[1])
        ok = all(torch.all(p == float(step)).item() for p in ddp.module.parameters())
    with open(report, "a") as f:
        f.write(json.dumps({"resumed": step if latest else None, "weights_match_step": ok}) + "\n")
    while True:
        step += 1
        with torch.no_grad():
            for p in ddp.module.parameters():
                p.fill_(float(step))
        for p in ddp.parameters():
            p.main_grad.zero_()
        opt.step()  # lr * Adam(0) leaves the weights; gives the optimizer its state
        _event(events, save=step, at="start")
        staging = store.staging_dir(step)
        (staging / "megatron").mkdir(parents=True)
        save_model_and_optimizer([ddp], opt, staging / "megatron")
        store.commit(step)
        _event(events, save=step, at="end")


def _start(tmp_path) -> subprocess.Popen:
    args = [str(tmp_path / "ckpt"), str(tmp_path / "report.jsonl"), str(tmp_path / "events.jsonl")]
    return subprocess.Popen([sys.executable, __file__, *args], start_new_session=True)


def _events(tmp_path, pid: int) -> list[dict]:
    path = tmp_path / "events.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["pid"] == pid]


def _wait_for_save(tmp_path, proc, nth: int) -> None:
    """Until the saver has begun its ``nth`` save."""
    end = time.time() + START_TIMEOUT_S
    while sum(e["at"] == "start" for e in _events(tmp_path, proc.pid)) < nth:
        assert proc.poll() is None, f"the saver exited with {proc.returncode}"
        assert time.time() < end, f"no save {nth} within {START_TIMEOUT_S} s"
        time.sleep(0.02)


def _save_seconds(tmp_path) -> float:
    """The median duration of the saves seen so far (1 s before any)."""
    path = tmp_path / "events.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    begun = {(e["pid"], e["save"]): e["t"] for e in rows if e["at"] == "start"}
    took = [e["t"] - begun[(e["pid"], e["save"])] for e in rows if e["at"] == "end"]
    return statistics.median(took) if took else 1.0


def _members(proc) -> list:
    try:
        return [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_group(proc) -> list:
    """kill -9 of the saver's process group; returns the processes still alive after it."""
    members = _members(proc)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return [p.pid for p in still_running(members, 10)]


def test_kill_9_during_real_saves(tmp_path):
    rng = random.Random(1)
    report = tmp_path / "report.jsonl"
    for trial in range(KILLS + 1):  # the last start only checks what the last kill left
        proc = _start(tmp_path)
        if trial == KILLS:
            end = time.time() + START_TIMEOUT_S
            while (not report.exists() or len(report.read_text().splitlines()) < KILLS + 1) and time.time() < end:
                time.sleep(0.5)
            assert _kill_group(proc) == [], "processes outlived the kill"
            break
        # the first kill lands in the very first save (most likely leaving nothing to resume), the
        # second in a later save of its start (a complete checkpoint exists then), the rest anywhere
        nth = 1 if trial == 0 else 2 if trial == 1 else rng.choice([1, 2])
        _wait_for_save(tmp_path, proc, nth=nth)
        time.sleep(rng.uniform(0.0, _save_seconds(tmp_path)))
        assert _kill_group(proc) == [], "processes outlived the kill"
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(rows) == KILLS + 1
    assert all(r["weights_match_step"] for r in rows), rows
    resumed = [r["resumed"] for r in rows[1:]]
    assert all(r is not None for r in resumed[1:]), rows  # the second start left a complete save
    steps = [r for r in resumed if r is not None]
    assert steps == sorted(steps), "a later start resumed from an older checkpoint"


def _kind(p, saver_cmdline) -> str:
    """What a process of the saver's tree is, from its command line."""
    try:
        cmdline = p.cmdline()
    except psutil.NoSuchProcess:
        return "gone"
    if cmdline == saver_cmdline:
        return "writer"  # dist_checkpointing's writers are forked from the saver
    if any("multiprocessing.resource_tracker" in part for part in cmdline):
        return "resource tracker"
    return " ".join(cmdline)[:120]


def test_kill_9_of_the_saver_alone_leaves_nothing(tmp_path):
    """SIGKILL of the saver's pid only (as the OOM killer or a crash ends one rank): its
    writer children, the results-queue Manager and the resource tracker all go too."""
    proc = _start(tmp_path)
    try:
        _wait_for_save(tmp_path, proc, nth=1)
        cmdline = psutil.Process(proc.pid).cmdline()
        end = time.time() + 120
        while "writer" not in {_kind(p, cmdline) for p in _members(proc)[1:]}:  # mid-write
            assert proc.poll() is None and time.time() < end, "no writer process seen"
            time.sleep(0.005)
        members = _members(proc)[1:]
        kinds = {p.pid: _kind(p, cmdline) for p in members}
        proc.kill()
        proc.wait()
        killed = time.time()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert {"writer", "resource tracker"} <= set(kinds.values()), kinds
    alive = still_running(members, EXIT_WITHIN_S)
    for p in alive:
        p.kill()
    assert not alive, f"outlived the saver: {[(p.pid, kinds[p.pid]) for p in alive]}"
    print(f"{len(members)} processes gone {time.time() - killed:.2f} s after the saver")


if __name__ == "__main__":
    saver(*sys.argv[1:])
