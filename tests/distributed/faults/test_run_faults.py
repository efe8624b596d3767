"""Faults of a real training run (torchrun, 2 ranks, the tiny CPU model): a second run on the
same directory, kill -9 of a rank, a disk that fills up during a save. Each asserts that
nothing was lost, nothing damaged is resumed from, and nothing is left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_cegppo.testing.launch import finish, metrics_lines, start_training, wait_until
from megatron_cegppo.testing.tiny import TINY_CONFIG
from megatron_cegppo.testing.tiny import prepare_tiny_run

pytestmark = pytest.mark.distributed

LEAN = ["algorithm.prompts_per_step=8", "algorithm.micro_batch_size=8", "rollout.n=4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    return prepare_tiny_run(tmp, prompts=32) + LEAN


def _steps(run_dir: Path) -> list:
    from megatron_cegppo.tracking.metrics import read_metrics

    return [m["step"] for m in read_metrics(run_dir)]


def test_a_second_run_on_a_busy_directory_is_refused_naming_the_holder(tiny, tmp_path):
    import psutil

    run_dir = tmp_path / "run"
    # more steps than the test takes: the first run holds the directory until the STOP file
    first = start_training(tiny + [f"trainer.run_dir={run_dir}", "trainer.steps=100000"], tmp_path / "first.log")
    try:
        wait_until(lambda: metrics_lines(run_dir) >= 1, timeout=300, proc=first, what="the first run's step 0",
                   log=tmp_path / "first.log")
        config_before = (run_dir / "config.yaml").read_bytes()
        from megatron_cegppo.tracking.run_lock import LOCK_NAME

        holder = json.loads((run_dir / LOCK_NAME).read_text())
        second = subprocess.run(
            [sys.executable, "-m", "megatron_cegppo.cli", "train", "--config", str(TINY_CONFIG), *tiny,
             f"trainer.run_dir={run_dir}", "parallel.tensor=1", "trainer.seed=5"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300)
        said = [line for line in second.stderr.splitlines() if line.startswith("megatron-cegppo:")]
        assert second.returncode != 0
        assert len(said) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        ranks = [p.pid for p in psutil.Process(first.pid).children(recursive=True)
                 if "megatron_cegppo.cli" in " ".join(p.cmdline())]
        assert holder["pid"] in ranks and f"pid {holder['pid']}" in said[0] and holder["host"] in said[0], said[0]
        assert (run_dir / "config.yaml").read_bytes() == config_before, "the refused run replaced config.yaml"
        (run_dir / "STOP").write_text("requested\n")
        finish(first, timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    steps = _steps(run_dir)
    assert steps == list(range(len(steps))) and steps, steps
    assert json.loads((run_dir / "STOPPED").read_text())["step"] == steps[-1]


def test_kill_9_of_a_rank_ends_the_run_and_leaves_the_last_checkpoint(tiny, tmp_path):
    import psutil

    from megatron_cegppo.checkpoint.store import CheckpointStore

    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    proc = start_training(tiny + [f"trainer.run_dir={run_dir}", "trainer.steps=40", "trainer.save_every=1"], log)
    try:
        wait_until(lambda: (run_dir / "checkpoints" / "latest").exists() and metrics_lines(run_dir) >= 2,
                   timeout=300, proc=proc, what="the first checkpoint and step 1", log=log)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "megatron_cegppo.cli" in " ".join(p.cmdline())]
        session = [p for p in psutil.Process(proc.pid).children(recursive=True)]
        victim = max(ranks, key=lambda p: p.pid)
        victim.send_signal(signal.SIGKILL)
        assert finish(proc, timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _, alive = psutil.wait_procs(session, timeout=15)
    assert not alive, f"left running: {[(p.pid, p.cmdline()) for p in alive]}"
    store = CheckpointStore(run_dir / "checkpoints")
    latest = store.latest()
    assert latest is not None
    store.verify(latest)


@pytest.fixture
def small_disk(tmp_path):
    """A 14 MB tmpfs: room for one checkpoint of the tiny model (~9 MB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=14m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): the disk-full test needs root"
        print(reason)
        pytest.skip(reason)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_a_save_keeps_the_last_checkpoint_and_resumes(tiny, tmp_path, small_disk):
    from megatron_cegppo.checkpoint.store import CheckpointStore

    run_dir = small_disk / "run"
    common = tiny + [f"trainer.run_dir={run_dir}", "trainer.save_every=1", "trainer.keep_checkpoints=2"]
    log = tmp_path / "full.log"
    status = finish(start_training(common + ["trainer.steps=3"], log), timeout=400)
    output = log.read_text()
    assert status != 0, output[-3000:]
    said = [line for line in output.splitlines() if "megatron-cegppo:" in line]
    assert len(said) == 1 and "saving step 1 failed" in said[0] and "is full" in said[0], output[-3000:]
    store = CheckpointStore(run_dir / "checkpoints")
    latest = store.latest()
    assert latest is not None and latest.name == "step_00000000", output[-3000:]
    store.verify(latest)
    # room again: the next start resumes from the step that was saved, nothing else lost
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    log = tmp_path / "resumed.log"
    assert finish(start_training(common + ["trainer.steps=3"], log), timeout=400) == 0, log.read_text()[-3000:]
    assert "resumed from" in log.read_text() and "step_00000000" in log.read_text()
    assert _steps(run_dir) == [0, 1, 2]
    assert store.latest().name == "step_00000002"
