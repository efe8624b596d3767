"""``megatron-cegppo sweep``: two settings x one seed x three steps of the tiny task, the
sweep killed (SIGKILL) while the second run trains and started again. The killed sweep's
training process dies with it; the second start skips the finished run (its files untouched)
and resumes the other from its checkpoint; the summary names both settings, with numbers
recomputed here from the runs' metrics, and draws both plots. The runs' output holds none of
the libraries' known noise."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from megatron_cegppo.console import NOISE
from megatron_cegppo.testing.launch import wait_until
from megatron_cegppo.testing.leaks import still_running
from megatron_cegppo.testing.tiny import TINY_CONFIG, prepare_tiny_run
from megatron_cegppo.tracking.metrics import read_metrics

pytestmark = pytest.mark.distributed

SETTINGS = ("beta1=0.5", "beta1=1")


def start_sweep(out: Path, common: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "megatron_cegppo.cli", "sweep", "--config", str(TINY_CONFIG), "--out", str(out),
           "--grid", "algorithm.beta1=0.5,1", "--seeds", "0", *common]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_sweep_killed_and_resumed(tmp_path):
    common = prepare_tiny_run(tmp_path) + [
        "parallel.tensor=1", "trainer.steps=3", "trainer.save_every=1", "algorithm.prompts_per_step=8",
        "algorithm.micro_batch_size=8", "rollout.n=4"]
    out = tmp_path / "sweep"
    first, second = (out / name / "seed0" for name in SETTINGS)
    sweep = start_sweep(out, common, tmp_path / "first.log")
    try:
        wait_until(lambda: (first / "SWEEP_DONE.json").is_file() and (second / "checkpoints" / "latest").exists(),
                   timeout=600, proc=sweep, what="the second run's first checkpoint", log=tmp_path / "first.log")
        training = psutil.Process(sweep.pid).children(recursive=True)
        assert training, "the second run is not running"
        done_before = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}
        os.kill(sweep.pid, signal.SIGKILL)  # the sweep alone: its run must follow it
        sweep.wait()
        assert still_running(training, 30.0) == [], "a training process outlived the killed sweep"
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()

    again = start_sweep(out, common, tmp_path / "second.log")
    assert again.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log = (tmp_path / "second.log").read_text()
    assert f"[sweep 1/2] {SETTINGS[0]} seed 0: done earlier, skipped" in log, log
    assert f"[sweep 2/2] {SETTINGS[1]} seed 0: resuming" in log, log
    assert "resumed from" in (second / "sweep_train.log").read_text()
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == done_before  # untouched
    assert [r["step"] for r in read_metrics(second)] == [0, 1, 2]

    table = json.loads((out / "summary.json").read_text())
    assert list(table) == list(SETTINGS)
    for name, run_dir in zip(SETTINGS, (first, second)):
        entropy = [r["entropy"] for r in read_metrics(run_dir)]
        rewards = [r["reward_mean"] for r in read_metrics(run_dir)]
        row = table[name]
        assert row["seeds"] == [0] and row["steps"] == [3]
        assert row["entropy_mean"]["mean"] == pytest.approx(sum(entropy) / 3, rel=1e-12)
        assert row["entropy_final"]["mean"] == pytest.approx(entropy[-1], rel=1e-12)  # the last 10%: one step
        assert row["reward_first"]["mean"] == pytest.approx(rewards[0], rel=1e-12)
        assert row["wall_s"]["mean"] > 0
    text = (out / "summary.md").read_text()
    assert all(f"| {name} | 1 |" in text for name in SETTINGS), text
    for plot in ("entropy.png", "reward.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # what `train` printed: none of the libraries' known noise (megatron_cegppo/console.py)
    printed = (first / "sweep_train.log").read_text() + (second / "sweep_train.log").read_text()
    assert printed.count("=== sweep: ") == 3  # two starts of the second run
    for noise in NOISE:
        assert not re.search(noise.pattern, printed), noise
