"""kill -9 at random moments while a real model and distributed optimizer are being saved
through dist_checkpointing, 10 times: every next start resumes from a complete checkpoint
whose weights are the ones saved at its step."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import time

import pytest
import torch

pytestmark = pytest.mark.distributed


def _model():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.config.schema import OptimConfig
    from megatron_cegppo.models import build_gpt_model_chunks
    from megatron_cegppo.parallel.cpu_compat import apply_cpu_compat
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


def saver(root: str, report: str) -> None:
    """One 'start': check what the store offers, then keep saving new steps. Its own process
    group: a kill of the group takes dist_checkpointing's writer children with it, as a job's
    end does (a kill of the saver alone would leave them running under PID 1)."""
    os.setpgid(0, 0)
    from megatron_cegppo.checkpoint.megatron_state import load_model_and_optimizer, save_model_and_optimizer
    from megatron_cegppo.checkpoint.store import CheckpointStore

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
        staging = store.staging_dir(step)
        (staging / "megatron").mkdir(parents=True)
        save_model_and_optimizer([ddp], opt, staging / "megatron")
        store.commit(step)


def _kill_group(proc) -> list:
    """kill -9 of the saver's process group; returns the processes still alive after it."""
    import psutil

    try:
        members = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        members = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.join()
    _, alive = psutil.wait_procs([p for p in map(_process, members) if p is not None], timeout=10)
    return [p.pid for p in alive]


def _process(pid):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def test_kill_9_during_real_saves(tmp_path):
    ctx = mp.get_context("spawn")
    rng = random.Random(1)
    report = tmp_path / "report.jsonl"
    for trial in range(11):  # the 11th start only checks what the 10th kill left
        proc = ctx.Process(target=saver, args=(str(tmp_path / "ckpt"), str(report)))
        proc.start()
        if trial == 10:
            end = time.time() + 120
            while len(report.read_text().splitlines()) < 11 and time.time() < end:
                time.sleep(0.5)
            assert _kill_group(proc) == [], "processes outlived the kill"
            break
        time.sleep(rng.uniform(8.0, 14.0))  # start-up takes ~6 s; saves take ~1-3 s each
        assert _kill_group(proc) == [], "processes outlived the kill"
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(rows) == 11
    assert all(r["weights_match_step"] for r in rows), rows
    resumed = [r["resumed"] for r in rows[1:]]
    assert sum(r is not None for r in resumed) >= 8, rows
    steps = [r for r in resumed if r is not None]
    assert steps == sorted(steps), "a later start resumed from an older checkpoint"
