"""SIGTERM to torchrun while a checkpoint is being written (torchrun passes it on with
``killpg`` to every rank's process group, checkpoint writers included): the save finishes and
commits, the run stops as on any stop request (the STOPPED marker), and nothing is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_cegppo.testing.multiprocess import free_port
from megatron_cegppo.testing.tiny import prepare_tiny_run

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[3]


def test_sigterm_during_a_save_lets_it_finish_then_stops(tmp_path):
    from megatron_cegppo.checkpoint.store import CheckpointStore
    from megatron_cegppo.tracking.metrics import read_metrics

    run_dir = tmp_path / "run"
    overrides = prepare_tiny_run(tmp_path, prompts=32) + [
        f"trainer.run_dir={run_dir}", "trainer.steps=4", "trainer.save_every=1",
        "algorithm.prompts_per_step=8", "algorithm.micro_batch_size=8", "rollout.n=4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={free_port()}",
           str(Path(__file__).with_name("slow_save_train.py")), "--config", "configs/tiny_cpu.yaml", *overrides]
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        end = time.time() + 300
        while not list(run_dir.glob("writing.*")) and proc.poll() is None and time.time() < end:
            time.sleep(0.05)
        assert list(run_dir.glob("writing.*")), f"no second save began:\n{(tmp_path / 'log.txt').read_text()[-3000:]}"
        proc.send_signal(signal.SIGTERM)  # as srun does on scancel or preemption
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    output = (tmp_path / "log.txt").read_text()
    store = CheckpointStore(run_dir / "checkpoints")
    latest = store.latest()
    assert latest is not None and latest.name == "step_00000001", output[-3000:]
    store.verify(latest)  # every file the digests name, as written
    assert not list((run_dir / "checkpoints").glob(".staging*")), "a staging folder was left"
    marker = json.loads((run_dir / "STOPPED").read_text())
    assert marker["step"] == 1, marker
    assert [m["step"] for m in read_metrics(run_dir)] == [0, 1]
    assert "BrokenPipeError" not in output, output[-3000:]
