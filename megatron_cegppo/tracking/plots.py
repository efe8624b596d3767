"""PNG plots of a run's ``metrics.jsonl``.

Figures are built on matplotlib's Agg canvas directly (no pyplot), so this works without
a display and does not change the process-wide matplotlib backend.

    python -m megatron_cegppo.tracking.plots RUN_DIR [--keys K ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import read_metrics

ROLLING_WINDOW = 5
DPI = 100


@dataclass(frozen=True)
class PlotSpec:
    filename: str
    title: str
    ylabel: str
    keys: tuple[str, ...]
    rolling: bool = False  # add a trailing rolling mean (noisy per-step rewards)
    requires: str = ""  # drawn only when this metric was logged


STANDARD_PLOTS = (
    PlotSpec("reward.png", "Reward", "mean reward", ("reward_mean",), rolling=True),
    PlotSpec("entropy.png", "Policy entropy", "entropy (nats/token)", ("entropy",)),
    PlotSpec("clipping.png", "Clipping", "fraction of tokens",
             ("clipfrac_low", "clipfrac_high", "dualclip_frac")),
    PlotSpec("quadrants.png", "Token quadrants (advantage sign x probability)",
             "fraction of tokens",
             ("quadrant/pa_hp_frac", "quadrant/pa_lp_frac",
              "quadrant/na_hp_frac", "quadrant/na_lp_frac")),
    # the entropy-target controller (algorithm.entropy_control): its betas against its target
    PlotSpec("entropy_control.png", "Entropy control: the betas used and the target",
             "beta / entropy (nats/token)", ("control/beta1", "control/beta2", "control/target", "entropy"),
             requires="control/beta1"),
)


VALIDATION_PREFIX = "val/"  # the in-run validation's metrics (trainer/validation_phase.py)


def _series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) for ``key``, sorted by step; logged non-finite values become NaN,
    which matplotlib draws as a gap."""
    points = sorted(
        (r["step"], math.nan if r[key] is None else float(r[key])) for r in records if key in r
    )
    return [s for s, _ in points], [v for _, v in points]


def rolling_mean(values: Sequence[float], window: int = ROLLING_WINDOW) -> list[float]:
    """Trailing mean over the last ``window`` finite values (shorter at the start)."""
    out = []
    for i in range(len(values)):
        finite = [v for v in values[max(0, i - window + 1): i + 1] if math.isfinite(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def _draw(spec: PlotSpec, records: Sequence[dict], keys: Iterable[str], path: Path) -> Path:
    fig = Figure(figsize=(7, 4), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key in keys:
        steps, values = _series(records, key)
        ax.plot(steps, values, label=key, linewidth=1.0,
                alpha=0.45 if spec.rolling else 1.0, marker="." if len(steps) < 50 else None)
        if spec.rolling:
            ax.plot(steps, rolling_mean(values), linewidth=2.0,
                    label=f"{key} (rolling mean, {ROLLING_WINDOW} steps)")
    ax.set_title(spec.title)
    ax.set_xlabel("step")
    ax.set_ylabel(spec.ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _safe_filename(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("._") or "metric"


def plot_run(
    run_dir: str | os.PathLike,
    keys: Sequence[str] | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Write PNGs for ``run_dir/metrics.jsonl`` into ``out_dir`` (default ``run_dir/plots``).

    With ``keys=None`` the standard figures are drawn (reward, entropy, clipping, validation,
    quadrants), each only if at least one of its metrics was logged. With ``keys`` only
    those metrics are drawn: inside their standard figure where they have one, otherwise
    each in ``<key>.png``. Returns the written paths.
    """
    records = read_metrics(run_dir)
    present = {k for r in records for k in r} - {"step", "nonfinite"}
    wanted = present if keys is None else present & set(keys)
    if keys is not None:
        missing = [k for k in keys if k not in present]
        if missing:
            print(f"plot_run: not in metrics, skipped: {', '.join(missing)}", file=sys.stderr)

    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    jobs: list[tuple[PlotSpec, list[str]]] = []
    for spec in STANDARD_PLOTS:
        drawn = [k for k in spec.keys if k in wanted]
        if drawn and (not spec.requires or spec.requires in wanted):
            jobs.append((spec, drawn))
    validation = sorted(k for k in wanted if k.startswith(VALIDATION_PREFIX))
    if validation:  # one line per validation set and measure
        jobs.append((PlotSpec("validation.png", "Validation", "accuracy", tuple(validation)), validation))
    if keys is not None:
        standard = {k for spec in STANDARD_PLOTS for k in spec.keys} | set(validation)
        for key in dict.fromkeys(keys):
            if key in wanted and key not in standard:
                jobs.append((PlotSpec(f"{_safe_filename(key)}.png", key, key, (key,)), [key]))

    if jobs:
        out.mkdir(parents=True, exist_ok=True)
    return [_draw(spec, records, drawn, out / spec.filename) for spec, drawn in jobs]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_cegppo.tracking.plots",
        description="Plot a run's metrics.jsonl into PNG files.",
    )
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("--keys", nargs="+", default=None,
                        help="only these metrics (others than the standard ones get a PNG each)")
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
    args = parser.parse_args(argv)

    paths = plot_run(args.run_dir, args.keys, out_dir=args.out)
    if not paths:
        print(f"no plottable metrics in {args.run_dir}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
