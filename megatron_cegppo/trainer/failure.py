"""A training run that fails after start-up says so once, in one line naming the problem; each
rank's traceback goes to its log file in the run directory, not to every terminal.

Which rank speaks: the errors below that every rank meets alike (decided on one rank and
broadcast, or found by an all-reduce, or read from the same files) are reported by rank 0
only. Any other error is reported by the rank that saw it, except the broken-connection
errors the other ranks then get from their collectives: those are its consequence.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Callable

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2  # as for the problems found before start-up


def _every_rank_errors() -> tuple:
    from megatron_cegppo.checkpoint.store import CheckpointError
    from megatron_cegppo.config.errors import ConfigError
    from megatron_cegppo.data.prompts import DataError
    from megatron_cegppo.platform import PlatformError
    from megatron_cegppo.tracking.run_lock import RunLockedError
    from megatron_cegppo.trainer.policy_update import NonFiniteError

    return ConfigError, CheckpointError, DataError, NonFiniteError, PlatformError, RunLockedError


def _is_consequence(exc: BaseException) -> bool:
    """A collective that failed because a peer went away."""
    try:
        from torch.distributed import DistError
    except ImportError:  # older torch
        DistError = ()  # noqa: N806
    text = str(exc)
    return isinstance(exc, DistError) or any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted"))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def write_traceback(run_dir: str, exc: BaseException) -> str:
    """The traceback of ``exc`` in ``<run_dir>/logs/error.rank<N>.txt`` (its path), or on stderr
    when that cannot be written (its text is then said to be there)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    path = Path(run_dir) / "logs" / f"error.rank{_rank():05d}.txt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"host {socket.gethostname()} pid {os.getpid()} rank {_rank()}\n{text}")
        return str(path)
    except OSError:
        sys.stderr.write(text)
        return "stderr above"


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a multi-line message's lines joined with '; ')."""
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip(" -")]
    if len(lines) > 1 and lines[0].endswith(":"):  # "header:" then one item per line
        message = f"{lines[0]} {'; '.join(lines[1:])}"
    else:
        message = "; ".join(lines) or type(exc).__name__
    return message if isinstance(exc, _every_rank_errors()) else f"{type(exc).__name__}: {message}"


def report_failure(exc: BaseException, run_dir: str) -> int:
    """Reports ``exc`` as this rank should (see the module); returns the exit status: 2 for
    bad input found at start-up (a config or data problem), 1 otherwise."""
    where = write_traceback(run_dir, exc)
    rank = _rank()
    if isinstance(exc, _every_rank_errors()):
        speaks = rank == 0
    else:
        speaks = not _is_consequence(exc)
    if speaks:
        who = "" if rank == 0 else f"rank {rank} ({socket.gethostname()}): "
        print(f"megatron-cegppo: {who}{one_line(exc)} (traceback: {where})", file=sys.stderr, flush=True)
    from megatron_cegppo.config.errors import ConfigError
    from megatron_cegppo.data.prompts import DataError

    return EXIT_BAD_INPUT if isinstance(exc, (ConfigError, DataError)) else EXIT_FAILED


def run_reporting_failures(fn: Callable[[], int], run_dir: str) -> int:
    """``fn()``'s exit status, or :data:`EXIT_FAILED` once a failure has been reported."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - torch.distributed.checkpoint's errors are BaseExceptions
        return report_failure(exc, run_dir)
