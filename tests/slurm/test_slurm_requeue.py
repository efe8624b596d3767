"""The batch script on a real local Slurm cluster (2 fake nodes, one process per node,
training TP=2 across the nodes): a job requeued with ``scontrol requeue`` after its first
checkpoint resumes and ends with the metrics of an uninterrupted job."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
TIMING = ("time/", "tokens_per_second")


def _submit(run_dir: Path, *overrides: str, time_limit="10:00", signal_seconds=300) -> str:
    cmd = [sys.executable, "-m", "megatron_cegppo.cli", "submit", "--config", "configs/tiny_cpu.yaml",
           "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", time_limit,
           "--signal-seconds", str(signal_seconds), f"trainer.run_dir={run_dir}", "trainer.save_every=2",
           "algorithm.prompts_per_step=8", "rollout.n=4", "algorithm.micro_batch_size=16", *overrides]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.split("submitted job ")[1].split()[0]


def _job(job_id: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def _wait(job_id: str, timeout: float = 600) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        info = _job(job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return info
        time.sleep(2)
    subprocess.run(["scancel", job_id])
    raise TimeoutError(f"job {job_id} still {_job(job_id).get('JobState')} after {timeout} s")


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("sbatch") is None:
        pytest.fail("no Slurm client: start the local cluster with tests/slurm/local-cluster.sh (scripts/test.sh does)")
    nodes = subprocess.run(["sinfo", "-h", "-o", "%D"], capture_output=True, text=True).stdout.split()
    assert nodes and int(nodes[0]) >= 2, "the local cluster needs 2 nodes (SLURM_CI_NODES=2)"
    subprocess.run([sys.executable, "-m", "megatron_cegppo.demo.prepare"], cwd=ROOT, check=True)


def test_requeued_job_resumes_and_matches_an_uninterrupted_job(cluster, tmp_path):
    steps = "trainer.steps=6"
    whole = _wait(_submit(tmp_path / "whole", steps))
    assert whole["JobState"] == "COMPLETED", whole

    job = _submit(tmp_path / "requeued", steps)
    latest = tmp_path / "requeued" / "checkpoints" / "latest"
    end = time.time() + 300
    while not latest.exists() and time.time() < end:
        time.sleep(1)
    assert latest.exists(), "no checkpoint before the requeue"
    subprocess.run(["scontrol", "requeue", job], check=True)
    info = _wait(job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, info
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "requeued" / "logs").glob("*restart1*"))
    assert "resumed from" in logs
    assert _metrics(tmp_path / "requeued") == _metrics(tmp_path / "whole")


def test_time_limit_signal_saves_and_requeues_by_itself(cluster, tmp_path):
    """The signal the time limit sends (``--signal=B:USR1@N``: USR1 to the batch shell),
    delivered with ``scancel --batch --signal=USR1`` so that the test does not depend on
    slurmctld's ~30 s time-limit check: the batch shell asks the trainer to stop, the trainer
    saves and exits 3, the script requeues the job, and the next start finishes the run."""
    run_dir = tmp_path / "limited"
    job = _submit(run_dir, "trainer.steps=8")
    latest = run_dir / "checkpoints" / "latest"
    end = time.time() + 300
    while not latest.exists() and time.time() < end:
        time.sleep(1)
    assert latest.exists(), "no checkpoint before the signal"
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    info = _wait(job, timeout=600)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, info
    batch_log = "".join(p.read_text(errors="replace") for p in (run_dir / "logs").glob("*.out"))
    assert "USR1: asking the trainer to save and stop" in batch_log and "saved; requeueing" in batch_log
    assert [m["step"] for m in _metrics(run_dir)] == list(range(8))
