"""Training runs started as users start them (``torchrun ... -m megatron_cegppo.cli train``),
for the fault tests: each in its own process group, its output in a log file, waited on by
observed events (a file appears, a metrics line is written) rather than fixed sleeps."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_cegppo.testing.multiprocess import free_port
from megatron_cegppo.testing.tiny import TINY_CONFIG


def start_training(overrides: Sequence[str], log: Path, *, nproc: int = 2, script: Optional[Path] = None,
                   config: Optional[str] = None) -> subprocess.Popen:
    """``torchrun --nproc-per-node nproc`` of the trainer (or of ``script``, which takes the
    trainer's arguments) on ``config`` (default: the demo's) in a new session, in the folder
    of ``log``, writing stdout and stderr to ``log``."""
    config = config or str(TINY_CONFIG)  # a file of the installed package
    target = [str(script)] if script else ["-m", "megatron_cegppo.cli", "train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           f"--master-port={free_port()}", *target, "--config", config, *overrides]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=Path(log).parent, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))


def wait_until(condition: Callable[[], bool], *, timeout: float, proc: Optional[subprocess.Popen] = None,
               what: str = "the condition", log: Optional[Path] = None) -> None:
    """Polls ``condition`` until it holds; fails naming ``what`` (with the log's tail) when
    ``timeout`` passes or ``proc`` exits first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    if condition():
        return
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    state = f"exited with {proc.returncode}" if proc is not None and proc.poll() is not None else "still running"
    raise AssertionError(f"{what} did not happen (the run {state}):\n{tail}")


def finish(proc: subprocess.Popen, timeout: float = 120) -> int:
    """Waits for ``proc``; kills its whole session if it does not end in time."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        raise


def metrics_lines(run_dir: Path) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0
