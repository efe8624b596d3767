"""Run tracking: run directory + config, per-step metrics (JSONL + TensorBoard), plots,
progress bars and phase timers.

``plot_run`` is loaded on first use so that training processes do not import matplotlib.
"""

from .metrics import MetricsWriter, read_metrics
from .progress import PhaseTimer, progress
from .run_dir import atomic_write_text, prepare_run_dir

__all__ = [
    "prepare_run_dir",
    "atomic_write_text",
    "MetricsWriter",
    "read_metrics",
    "plot_run",
    "progress",
    "PhaseTimer",
]


def __getattr__(name):
    if name == "plot_run":
        from .plots import plot_run

        return plot_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
