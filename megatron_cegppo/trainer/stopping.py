"""How a run is asked to stop, and how it tells its launcher that it stopped after saving.

A stop request reaches the trainer as a signal (SIGTERM, SIGUSR1) or as a ``STOP`` file in the
run directory, which the Slurm batch script writes: a file reaches every rank of every node
without crossing srun and torchrun. When the trainer has saved and stopped on request, it
writes the ``STOPPED`` marker after the checkpoint has committed. The batch script reads the
marker, not the exit code: torchrun turns a worker's exit code 3 into 1 (its ``@record``
wrapper re-raises ``ChildFailedError``), so the code cannot carry the news.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from megatron_cegppo.tracking.run_dir import atomic_write_text

STOP_FILE = "STOP"
STOPPED_MARKER = "STOPPED"


def stop_file_present(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / STOP_FILE).exists()


def stop_file_urgent(run_dir: str | os.PathLike) -> bool:
    """The batch script writes ``preempt`` into the ``STOP`` file on SIGTERM (preemption or
    cancellation: SIGKILL follows after the grace time), not on the time-limit signal."""
    try:
        return (Path(run_dir) / STOP_FILE).read_text().strip().startswith("preempt")
    except OSError:
        return False


def clear_stopped_marker(run_dir: str | os.PathLike) -> None:
    """At start-up: a marker belongs to the start that wrote it."""
    (Path(run_dir) / STOPPED_MARKER).unlink(missing_ok=True)


def write_stopped_marker(run_dir: str | os.PathLike, step: int, reason: str) -> Path:
    """Written (atomically) once the checkpoint of ``step`` has committed."""
    record = {"step": step, "reason": reason, "job_id": os.environ.get("SLURM_JOB_ID"),
              "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}
    return atomic_write_text(Path(run_dir) / STOPPED_MARKER, json.dumps(record) + "\n")


def read_stopped_marker(run_dir: str | os.PathLike) -> Optional[dict]:
    path = Path(run_dir) / STOPPED_MARKER
    return json.loads(path.read_text()) if path.is_file() else None


# --- Stopping before the time limit, from measured step and save times -----------------------
#
# The batch script's stop signal comes a fixed lead (``--signal-seconds``) before the time
# limit; a step of a large config can take longer than that. The batch script therefore
# exports the job's end time, and the trainer stops by itself, after saving, once the time
# left is shorter than one more step plus a save. The measured times are kept in
# ``<run_dir>/timing.json`` across starts, so that a restart knows them before its first step
# and ``submit`` can derive the signal lead from them.

JOB_END_TIME_ENV = "CEGPPO_JOB_END_TIME"  # the job's end time, Unix epoch seconds (unset: unknown)
STOP_LEAD_ENV = "CEGPPO_STOP_LEAD_SECONDS"  # how long before the end the batch shell is signalled
TIMING_FILE = "timing.json"

# Step times vary (response lengths, dynamic-sampling rounds, a slow node): plan for the worst
# recent step and a save, each 25% longer than measured.
SAFETY_FACTOR = 1.25
# slurmctld enforces time limits from a periodic check (about every 30 s) and the end time is
# known only to the second from the start time; the batch script still has to requeue the job
# after the trainer exits. One minute covers all of it.
SLURM_MARGIN_SECONDS = 60.0
# How many recent times are kept (and persisted): the worst of them is planned for.
RECENT_TIMES = 8


def _env_seconds(environ, name: str) -> Optional[float]:
    raw = (environ.get(name) or "").strip()
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value > 0 and value == value and value != float("inf") else None


def _clean_times(values) -> list:
    out = []
    for v in values or ():
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if v >= 0 and v == v and v != float("inf"):
            out.append(v)
    return out[-RECENT_TIMES:]


class StopClock:
    """When to stop before the job's time limit: measured step and save times against the
    end time that the batch script exported. Pure: the current time is passed in (or read
    from ``time.time()`` when not given); nothing here sleeps or signals."""

    def __init__(self, job_end_time: Optional[float] = None, stop_lead_seconds: Optional[float] = None,
                 step_seconds=(), save_seconds=()):
        self.job_end_time = job_end_time
        self.stop_lead_seconds = stop_lead_seconds
        self.step_seconds = _clean_times(step_seconds)
        self.save_seconds = _clean_times(save_seconds)

    @classmethod
    def from_env(cls, environ=None, *, measured: Optional["StopClock"] = None) -> "StopClock":
        """End time and signal lead from ``CEGPPO_JOB_END_TIME`` / ``CEGPPO_STOP_LEAD_SECONDS``
        (missing or unreadable: unknown); step and save times from ``measured`` (for example
        ``load_timing(run_dir)``: the times a previous start measured)."""
        environ = os.environ if environ is None else environ
        return cls(_env_seconds(environ, JOB_END_TIME_ENV), _env_seconds(environ, STOP_LEAD_ENV),
                   measured.step_seconds if measured else (), measured.save_seconds if measured else ())

    def record_step(self, seconds: float) -> None:
        self.step_seconds = _clean_times(self.step_seconds + [seconds])

    def record_save(self, seconds: float) -> None:
        self.save_seconds = _clean_times(self.save_seconds + [seconds])

    def needed_seconds(self) -> Optional[float]:
        """Time that one more step and a save need, with margins; ``None`` before any step
        was measured. Before a save was measured, a save counts as long as a step."""
        if not self.step_seconds:
            return None
        step = max(self.step_seconds)
        save = max(self.save_seconds) if self.save_seconds else step
        return SAFETY_FACTOR * (step + save) + SLURM_MARGIN_SECONDS

    def seconds_left(self, now: Optional[float] = None) -> Optional[float]:
        if self.job_end_time is None:
            return None
        import time

        return self.job_end_time - (time.time() if now is None else now)

    def should_stop(self, now: Optional[float] = None) -> Optional[str]:
        """A reason to save and stop now, or ``None`` (also when the end time is unknown or
        nothing has been measured yet)."""
        needed, left = self.needed_seconds(), self.seconds_left(now)
        if needed is None or left is None or left >= needed:
            return None
        return (f"{max(left, 0.0):.0f} s left before the job's time limit, less than the {needed:.0f} s "
                f"that one more step and a save need")

    def lead_warning(self) -> Optional[str]:
        """When the stop signal would come too late for one more step and a save."""
        needed = self.needed_seconds()
        if needed is None or self.stop_lead_seconds is None or self.stop_lead_seconds >= needed:
            return None
        return (f"the stop signal comes {self.stop_lead_seconds:.0f} s before the time limit, but one step "
                f"and a save need {needed:.0f} s: submit with --signal-seconds {int(needed + 0.999)} or more")

    def to_dict(self) -> dict:
        return {"step_seconds": list(self.step_seconds), "save_seconds": list(self.save_seconds),
                "needed_seconds": self.needed_seconds()}

    @classmethod
    def from_dict(cls, data: dict) -> "StopClock":
        """Measured times only (``needed_seconds`` is recomputed; end time and lead belong to
        one start and come from :meth:`from_env`)."""
        if not isinstance(data, dict):
            raise ValueError(f"timing record must be a mapping, got {data!r}")
        return cls(step_seconds=data.get("step_seconds", ()), save_seconds=data.get("save_seconds", ()))


def save_timing(run_dir: str | os.PathLike, clock: StopClock) -> Path:
    return atomic_write_text(Path(run_dir) / TIMING_FILE, json.dumps(clock.to_dict()) + "\n")


def load_timing(run_dir: str | os.PathLike) -> Optional[StopClock]:
    """The times a previous start measured; ``None`` when there is no (readable) record."""
    path = Path(run_dir) / TIMING_FILE
    try:
        return StopClock.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None
