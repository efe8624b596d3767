"""Progress bars that stay quiet where they would only add noise, and per-phase timing."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from tqdm import tqdm

PROGRESS_ENV = "CEGPPO_PROGRESS"


def _stderr_is_tty() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # closed or detached stream
        return False


def progress_silenced(enabled: bool = True) -> bool:
    """True on non-reporting ranks (``enabled=False``), and when stderr is not a terminal
    (a log file, where redrawn bars pile up) and ``CEGPPO_PROGRESS=0``."""
    if not enabled:
        return True
    return not _stderr_is_tty() and os.environ.get(PROGRESS_ENV) == "0"


def progress(iterable_or_total: Iterable | int | None, *, desc: str | None = None,
             enabled: bool = True, **tqdm_kwargs) -> tqdm:
    """A tqdm bar over an iterable, or a manual one for an int total (advance with
    ``.update(n)``). When silenced the bar is disabled but keeps the same interface, so
    callers need no rank checks of their own."""
    if isinstance(iterable_or_total, int) and not isinstance(iterable_or_total, bool):
        iterable, total = None, iterable_or_total
    else:
        iterable, total = iterable_or_total, tqdm_kwargs.pop("total", None)
    return tqdm(iterable, total=total, desc=desc,
                disable=progress_silenced(enabled), dynamic_ncols=True, **tqdm_kwargs)


class PhaseTimer:
    """Wall-clock seconds per named phase, accumulated across ``phase()`` blocks.

    >>> timer = PhaseTimer()
    >>> with timer.phase("generate"):
    ...     pass
    >>> sorted(timer.summary())
    ['time/generate']
    """

    def __init__(self, prefix: str = "time/", clock: Callable[[], float] = time.perf_counter):
        self.prefix = prefix
        self._clock = clock
        self._totals: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self._clock()
        try:
            yield
        finally:
            # Counted even if the phase raised: the time was still spent.
            self._totals[name] = self._totals.get(name, 0.0) + (self._clock() - start)

    def summary(self) -> dict[str, float]:
        """``{"<prefix><phase>": seconds}`` in first-seen order, ready for MetricsWriter.log."""
        return {f"{self.prefix}{name}": seconds for name, seconds in self._totals.items()}

    def reset(self) -> None:
        self._totals.clear()
