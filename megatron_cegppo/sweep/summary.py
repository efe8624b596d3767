"""A sweep's summary: per setting, the mean and spread over seeds of what each run did
(entropy at the end and on average, reward at the start and at the end, the clipped share of
each token quadrant, wall time), as a Markdown table and JSON, and the entropy and reward over
steps, one line per setting (the mean over seeds) in a band (the seeds' range)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Sequence

from megatron_cegppo.config.schema import EntropyControlConfig
from megatron_cegppo.sweep.plan import SweepRun
from megatron_cegppo.sweep.runner import DONE

EDGE_FRACTION = 0.1  # "first" and "final": the mean over this share of the steps (at least one)
QUADRANTS = ("pa_lp", "pa_hp", "na_lp", "na_hp")  # advantage sign x token probability
COLUMNS = (
    ("entropy_final", "entropy, final"), ("entropy_mean", "entropy, mean"),
    ("reward_first", "reward, first"), ("reward_final", "reward, final"),
    *((f"clip_{q}", f"clipped {q.upper().replace('_', '-')}") for q in QUADRANTS),
    ("in_band", "in band, 2nd half"),
    ("wall_s", "wall s"),
)
# "in band": the share of the second half's steps whose entropy lies within BAND x the run's
# target: the entropy controller's own (control/target) where it ran, else the controller's
# default rule (TARGET_FRACTION x the mean entropy of the first TARGET_WARMUP steps), so that
# fixed-beta runs are judged against the target a controller would have set them. The warm-up
# is the study's 10 steps, a steadier starting mean than the default 5
TARGET_FRACTION, BAND = EntropyControlConfig.target_fraction, EntropyControlConfig.band
TARGET_WARMUP = 10
SMOOTHING = 10  # steps of the trailing mean drawn for reward


def _mean(values) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _steps(run: SweepRun) -> list[dict]:
    from megatron_cegppo.tracking.metrics import read_metrics

    return [r for r in read_metrics(run.run_dir) if r.get("step", -1) >= 0]


def run_summary(run: SweepRun) -> dict:
    """One run's numbers (NaN where a metric was not logged)."""
    records = _steps(run)
    n = max(1, round(len(records) * EDGE_FRACTION))
    series = lambda key: [r.get(key) for r in records]  # noqa: E731
    out = {
        "steps": len(records),
        "entropy_final": _mean(series("entropy")[-n:]), "entropy_mean": _mean(series("entropy")),
        "reward_first": _mean(series("reward_mean")[:n]), "reward_final": _mean(series("reward_mean")[-n:]),
        **{f"clip_{q}": _mean(series(f"quadrant/{q}_clipped_frac")) for q in QUADRANTS},
        "in_band": in_band_share(series("entropy"), [r.get("control/target") for r in records]),
    }
    done = run.run_dir / "sweep_wall_time.json"
    out["wall_s"] = json.loads(done.read_text())["wall_s"] if done.is_file() else math.nan
    return out


def in_band_share(entropy: list, targets: list) -> float:
    """The share of the second half's steps with entropy within ``BAND`` of the target (see
    ``TARGET_FRACTION``); NaN for a run too short to have a target and a second half."""
    logged = [t for t in targets if t is not None]
    target = logged[-1] if logged else TARGET_FRACTION * _mean(entropy[:TARGET_WARMUP])
    late = [e for e in entropy[max(len(entropy) // 2, TARGET_WARMUP):] if e is not None and math.isfinite(e)]
    if not late or not math.isfinite(target):
        return math.nan
    return sum(abs(e - target) <= BAND * target for e in late) / len(late)


def summarize(runs: Sequence[SweepRun], out: Path) -> dict:
    """Writes ``summary.md``, ``summary.json``, ``entropy.png`` and ``reward.png`` into ``out``
    from the finished runs (the others are named below the table); returns the JSON's content."""
    by_setting: dict[str, list[tuple[SweepRun, dict]]] = {}
    for run in runs:  # finished runs only: a run cut short would mix steps of another range
        if (run.run_dir / DONE).is_file():
            by_setting.setdefault(run.setting.name, []).append((run, run_summary(run)))
    waiting = [run.label for run in runs if not (run.run_dir / DONE).is_file()]
    table = {}
    for name, results in by_setting.items():
        row = {"seeds": [r.seed for r, _ in results], "overrides": list(results[0][0].setting.overrides)}
        for key, _ in COLUMNS:
            values = [s[key] for _, s in results if math.isfinite(s[key])]
            row[key] = {"mean": statistics.fmean(values) if values else math.nan,
                        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "values": [s[key] for _, s in results]}
        row["steps"] = [s["steps"] for _, s in results]
        table[name] = row
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(table, indent=1, allow_nan=True) + "\n")
    (out / "summary.md").write_text(markdown_table(table) + (
        f"\nNot finished yet ({len(waiting)} of {len(runs)} runs): {', '.join(waiting)}.\n" if waiting else ""))
    if by_setting:
        for key, label, smooth in (("entropy", "token entropy (nats)", 1), ("reward_mean", "mean reward", SMOOTHING)):
            plot_over_steps({name: [r for r, _ in results] for name, results in by_setting.items()},
                            key, label, out / f"{'reward' if key == 'reward_mean' else key}.png", smooth=smooth)
    return table


def markdown_table(table: dict) -> str:
    head = "| setting | seeds | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [head, "|---|---|" + "---:|" * len(COLUMNS)]
    for name, row in table.items():
        cells = []
        for key, _ in COLUMNS:
            m, sd = row[key]["mean"], row[key]["sd"]
            digits = 0 if key == "wall_s" else 3
            cells.append("-" if not math.isfinite(m) else f"{m:.{digits}f} ± {sd:.{digits}f}")
        lines.append(f"| {name} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    note = (f"\nMean ± standard deviation over seeds. First / final: the mean over the first / last "
            f"{EDGE_FRACTION:.0%} of the steps; clipped: the share of each quadrant's tokens (positive / negative "
            f"advantage, low / high probability) that the clip bounds, averaged over the steps; in band: the share "
            f"of the second half's steps with entropy within ±{BAND:.0%} of the run's target (an entropy "
            f"controller's own, else {TARGET_FRACTION} x the mean entropy of the first {TARGET_WARMUP} steps).\n")
    return "\n".join(lines) + "\n" + note


def _trailing_mean(values: list, window: int) -> list:
    out = []
    for i in range(len(values)):
        out.append(_mean(values[max(0, i - window + 1): i + 1]))
    return out


def plot_over_steps(groups: dict[str, list[SweepRun]], key: str, label: str, path: Path, *, smooth: int) -> Path:
    """One line per setting: the mean over its seeds at each step (a trailing mean over
    ``smooth`` steps), in a band from the lowest to the highest seed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, runs in groups.items():
        per_seed = []
        for run in runs:
            points = {r["step"]: r.get(key) for r in _steps(run)}
            per_seed.append(points)
        steps = sorted(set().union(*per_seed))
        curves = [_trailing_mean([p.get(s) for s in steps], smooth) for p in per_seed]
        mean = [_mean(values) for values in zip(*curves)]
        low = [min((v for v in values if math.isfinite(v)), default=math.nan) for values in zip(*curves)]
        high = [max((v for v in values if math.isfinite(v)), default=math.nan) for values in zip(*curves)]
        line, = ax.plot(steps, mean, label=f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})", linewidth=1.5)
        if len(runs) > 1:
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel(label + (f" (trailing mean, {smooth} steps)" if smooth > 1 else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
