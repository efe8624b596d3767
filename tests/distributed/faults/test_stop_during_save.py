"""SIGTERM to torchrun while a checkpoint is being written (torchrun passes it on with
``killpg`` to every rank's process group, checkpoint writers included): the save finishes and
commits, the run stops as on any stop request (the STOPPED marker), and nothing is left."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from megatron_cegppo.testing.launch import finish, start_training, wait_until
from megatron_cegppo.testing.tiny import prepare_tiny_run

pytestmark = pytest.mark.distributed


def test_sigterm_during_a_save_lets_it_finish_then_stops(tmp_path):
    from megatron_cegppo.checkpoint.store import CheckpointStore
    from megatron_cegppo.tracking.metrics import read_metrics

    run_dir = tmp_path / "run"
    overrides = prepare_tiny_run(tmp_path, prompts=32) + [
        f"trainer.run_dir={run_dir}", "trainer.steps=4", "trainer.save_every=1",
        "algorithm.prompts_per_step=8", "algorithm.micro_batch_size=8", "rollout.n=4"]
    log = tmp_path / "log.txt"
    proc = start_training(overrides, log, script=Path(__file__).with_name("slow_save_train.py"))
    try:
        wait_until(lambda: bool(list(run_dir.glob("writing.*"))), timeout=300, proc=proc,
                   what="the second save's writers", log=log)
        proc.send_signal(signal.SIGTERM)  # as srun does on scancel or preemption
        finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    store = CheckpointStore(run_dir / "checkpoints")
    latest = store.latest()
    assert latest is not None and latest.name == "step_00000001", output[-3000:]
    store.verify(latest)  # every file the digests name, as written
    assert not list((run_dir / "checkpoints").glob(".staging*")), "a staging folder was left"
    marker = json.loads((run_dir / "STOPPED").read_text())
    assert marker["step"] == 1, marker
    assert [m["step"] for m in read_metrics(run_dir)] == [0, 1]
    assert "BrokenPipeError" not in output, output[-3000:]
