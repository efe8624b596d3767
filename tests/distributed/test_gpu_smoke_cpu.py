"""benchmarks/gpu_smoke.sh end to end on the CPU with tiny shapes, so that every branch the
GPU run shares with the CPU (training steps, parity, timing, the results file) stays working
without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
CHECKS = [
    "train cegppo", "train ppo", "train cispo", "train gspo",
    "parity logits float32", "parity fused float32", "parity logits bfloat16", "parity fused bfloat16",
    "timing torch baseline", "timing ours logits", "timing ours fused",
]


def test_gpu_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "smoke.md"
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh"), "--device", "cpu", "--shape-tokens", "256",
           "--shape-hidden", "64", "--shape-vocab", "512", "--warmup", "1", "--reps", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    text = out.read_text()
    assert "Result: PASS" in text
    for name in CHECKS:
        assert f"| {name} | PASS |" in text, f"{name!r} missing or failed in the results file"
    assert "megatron cross entropy" in text  # the optional row: timed, or the reason it was not
