"""launch/loss_demo.py under torchrun at TP2 (the README's loss demo): its rollouts go through
the platform's placement step and it prints one row per update."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_cegppo.testing.multiprocess import free_port

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[3]


def test_loss_demo_runs_at_tp2():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={free_port()}",
           str(ROOT / "launch" / "loss_demo.py"), "--tp", "2", "--pp", "1", "--epochs", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2], proc.stdout  # 1 epoch x 2 mini-batches
    assert all(len(r) == 11 for r in rows), proc.stdout
