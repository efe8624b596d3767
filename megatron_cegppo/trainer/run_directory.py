"""The run directory at start: one run holds it (the lock), and a fresh start neither appends to
another run's metrics nor replaces its config without saying so."""

from __future__ import annotations

import os
from pathlib import Path

from megatron_cegppo.platform import Layout
from megatron_cegppo.trainer.collectives import from_rank0

# longer than a step and a save of the largest configs: another host's lock whose heartbeat is
# older counts as abandoned
LOCK_STALE_AFTER_SECONDS = 3 * 3600


def lock_run_dir(layout: Layout, run_dir: str):
    """The run directory's lock, held by rank 0 for the job, taken before anything there is
    touched (resuming cleans the checkpoint staging area). The verdict reaches every rank, so a
    refused start stops everywhere instead of hanging at a barrier."""
    from megatron_cegppo.tracking.run_lock import RunLock, RunLockedError

    lock = RunLock(run_dir, stale_after_seconds=LOCK_STALE_AFTER_SECONDS, enabled=layout.rank == 0)
    error = None
    if layout.rank == 0:
        try:
            lock.acquire()
        except RunLockedError as exc:
            error = str(exc)
    error = from_rank0(layout, error)
    if error:
        raise RunLockedError(error)
    return lock


def set_aside_old_metrics(run_dir: Path) -> None:
    """A fresh start in a run directory that holds another run's metrics (but no checkpoint to
    resume from) keeps them as ``metrics.<timestamp>.jsonl``, instead of appending its step 0
    after their last step."""
    from datetime import datetime

    from megatron_cegppo.tracking.metrics import METRICS_NAME

    old = Path(run_dir) / METRICS_NAME
    if old.is_file() and old.stat().st_size:
        kept = old.parent / f"metrics.{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.jsonl"
        os.replace(old, kept)
        print(f"[megatron-cegppo] warning: {old} held the metrics of an earlier run without a checkpoint; "
              f"kept as {kept.name}, this run starts a new file", flush=True)


def prepare_for_start(run_dir: str, config: dict, *, fresh: bool, allow_config_change: bool) -> None:
    """Rank 0, once the preflight has passed: the config recorded (a resumed run refuses a
    change that alters results, unless allowed; a fresh start may change anything, the old
    config kept), an earlier stop marker cleared, earlier metrics set aside on a fresh start."""
    from megatron_cegppo.tracking.run_dir import prepare_run_dir
    from megatron_cegppo.trainer.stopping import clear_stopped_marker

    prepare_run_dir(run_dir, config, allow_config_change=allow_config_change or fresh)
    clear_stopped_marker(run_dir)
    if fresh:
        set_aside_old_metrics(Path(run_dir))
