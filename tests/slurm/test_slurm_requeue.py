"""The batch script on a real local Slurm cluster (2 fake nodes, one process per node,
training TP=2 across the nodes): a job requeued with ``scontrol requeue`` after its first
checkpoint, or stopped by a ``STOP`` file written by hand, resumes and ends with the metrics
of an uninterrupted job."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
TIMING = ("time/", "tokens_per_second")


def _submit(run_dir: Path, *overrides: str, time_limit="10:00", signal_seconds=300, cpus=1) -> str:
    cmd = [sys.executable, "-m", "megatron_cegppo.cli", "submit", "--config", "configs/tiny_cpu.yaml",
           "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", str(cpus), "--time", time_limit,
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


def _wait_for_checkpoint(run_dir: Path, timeout: float = 300) -> None:
    latest = run_dir / "checkpoints" / "latest"
    end = time.time() + timeout
    while not latest.exists() and time.time() < end:
        time.sleep(1)
    assert latest.exists(), "no checkpoint yet"


def _logs(run_dir: Path, pattern: str) -> str:
    return "".join(p.read_text(errors="replace") for p in (run_dir / "logs").glob(pattern))


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


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """The metrics of a 6-step job that nothing interrupts: what a stopped one must match."""
    run_dir = tmp_path_factory.mktemp("whole")
    info = _wait(_submit(run_dir, "trainer.steps=6"))
    assert info["JobState"] == "COMPLETED", info
    return _metrics(run_dir)


def test_requeued_job_resumes_and_matches_an_uninterrupted_job(uninterrupted, tmp_path):
    job = _submit(tmp_path / "requeued", "trainer.steps=6")
    _wait_for_checkpoint(tmp_path / "requeued")
    subprocess.run(["scontrol", "requeue", job], check=True)
    info = _wait(job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, info
    assert "resumed from" in _logs(tmp_path / "requeued", "*restart1*")
    assert _metrics(tmp_path / "requeued") == uninterrupted


# a free-text value that a second shell would split, unquote and redirect (a stop string that
# the arithmetic task's outputs never contain, so the samples are those of the uninterrupted job)
ODD_STOP = """it's a <stop> "$HOME" `id`"""


def test_stop_file_written_by_hand_requeues_and_the_run_resumes(uninterrupted, tmp_path):
    """An operator's ``STOP`` file (no Slurm signal): the trainer saves, writes ``STOPPED``, and
    exits 3, which torchrun reports as 1; the script requeues from the marker, and the next
    start resumes. Also: an override with a space, quotes and ``<>`` reaches the trainer as
    written; srun gets the batch's CPUs per task; the end time reaches the trainer's side."""
    run_dir = tmp_path / "stopped"
    job = _submit(run_dir, "trainer.steps=6", "rollout.stop=" + json.dumps([ODD_STOP]), cpus=2)
    _wait_for_checkpoint(run_dir)
    step = subprocess.run(["scontrol", "show", "step", f"{job}.0"], capture_output=True, text=True).stdout
    (run_dir / "STOP").write_text("")
    info = _wait(job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, info
    assert " CPUs=4 " in f" {step} ", step  # 2 nodes x SRUN_CPUS_PER_TASK=2 (not 1 CPU per task)
    batch = _logs(run_dir, "*.out")
    assert "saved; requeueing" in batch and "asking the trainer to save and stop" not in batch, batch
    assert "SRUN_CPUS_PER_TASK=2" in batch
    ends = [int(line.split("CEGPPO_JOB_END_TIME=")[1].split()[0])
            for line in batch.splitlines() if "CEGPPO_JOB_END_TIME=" in line]
    assert len(ends) >= 2 and all(0 < e - time.time() <= 610 for e in ends), ends  # start + 10:00
    assert "CEGPPO_STOP_LEAD_SECONDS=300" in batch
    nodes = _logs(run_dir, "*restart0-node*")
    assert nodes.count("GLOO_SOCKET_IFNAME=lo") == 2, nodes[-2000:]
    assert "resumed from" in _logs(run_dir, "*restart1*")
    assert not (run_dir / "STOP").exists() and not (run_dir / "STOPPED").exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["rollout"]["stop"] == [ODD_STOP]
    assert _metrics(run_dir) == uninterrupted


def test_time_limit_signal_saves_and_requeues_by_itself(cluster, tmp_path):
    """The signal the time limit sends (``--signal=B:USR1@N``: USR1 to the batch shell),
    delivered with ``scancel --batch --signal=USR1`` so that the test does not depend on
    slurmctld's ~30 s time-limit check: the batch shell asks the trainer to stop, the trainer
    saves and writes its ``STOPPED`` marker, the script requeues the job, and the next start finishes the run."""
    run_dir = tmp_path / "limited"
    job = _submit(run_dir, "trainer.steps=8")
    _wait_for_checkpoint(run_dir)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    info = _wait(job, timeout=600)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, info
    batch_log = _logs(run_dir, "*.out")
    assert "USR1: asking the trainer to save and stop" in batch_log and "saved; requeueing" in batch_log
    assert [m["step"] for m in _metrics(run_dir)] == list(range(8))
