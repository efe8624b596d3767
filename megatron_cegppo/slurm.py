"""``megatron-cegppo submit``: renders ``slurm/cegppo.sbatch`` for a config and submits it."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "cegppo.sbatch"


def render_sbatch(
    *, config: str, overrides: Sequence[str], run_dir: str, nodes: int, gpus_per_node: int,
    time: str, partition: Optional[str] = None, job_name: str = "cegppo", signal_seconds: int = 300,
    cpus_per_task: int = 64, procs_per_node: Optional[int] = None, python: str = sys.executable,
    log_dir: Optional[str] = None,
) -> str:
    """The batch script for a run; ``procs_per_node`` defaults to one process per GPU."""
    if nodes < 1 or gpus_per_node < 0:
        raise ValueError("nodes must be >= 1 and gpus_per_node >= 0")
    fields = {
        "JOB_NAME": job_name, "NODES": str(nodes), "GPUS_PER_NODE": str(gpus_per_node),
        "CPUS_PER_TASK": str(cpus_per_task), "TIME": time, "SIGNAL_SECONDS": str(signal_seconds),
        "LOG_DIR": shlex.quote(log_dir or f"{run_dir}/logs"), "RUN_DIR": shlex.quote(run_dir),
        "CONFIG": shlex.quote(str(Path(config).resolve())), "PYTHON": shlex.quote(python),
        "OVERRIDES": " ".join(shlex.quote(o) for o in overrides),
        "PROCS_PER_NODE": str(procs_per_node or max(1, gpus_per_node)),
        "PARTITION_LINE": f"#SBATCH --partition={partition}" if partition else "",
    }
    text = TEMPLATE.read_text()
    for key, value in fields.items():
        text = text.replace(f"@@{key}@@", value)
    if "@@" in text.replace("USR1@", ""):
        raise RuntimeError("an sbatch template field was left unfilled")
    if gpus_per_node == 0:  # CPU clusters (and the local test cluster)
        text = text.replace("#SBATCH --gpus-per-node=0\n", "")
    return text


def submit(script: str, out_path: Path, dry_run: bool) -> Optional[str]:
    """Writes the script and submits it; returns the job id (``None`` on a dry run)."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(script)
    if dry_run:
        print(script)
        return None
    result = subprocess.run(["sbatch", "--parsable", str(out_path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted job {job_id} ({out_path})")
    return job_id
