"""What a sweep runs: settings (a grid of values, named override sets, or both crossed) times
seeds, each run in ``<out>/<setting>/seed<N>``. Torch-free: a sweep's every run is checked
before the first one starts."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

_NAME = re.compile(r"^[A-Za-z0-9_.=,+-]+$")


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: tuple = ()


@dataclass(frozen=True)
class SweepRun:
    setting: Setting
    seed: int
    run_dir: Path
    overrides: tuple = field(default=())  # the whole override list of the run's `train`

    @property
    def label(self) -> str:
        return f"{self.setting.name} seed {self.seed}"


class SweepError(ValueError):
    """A sweep's arguments that cannot be run (every problem, one line each)."""

    def __init__(self, problems: Sequence[str]):
        super().__init__("invalid sweep:\n  - " + "\n  - ".join(problems))
        self.problems = list(problems)


def parse_grid(text: str) -> tuple[str, list[str]]:
    """``algorithm.beta1=0,0.5,1`` -> ``("algorithm.beta1", ["0", "0.5", "1"])``."""
    key, sep, values = text.partition("=")
    items = [v.strip() for v in values.split(",")]
    if not sep or not key.strip() or "." not in key or not all(items):
        raise SweepError([f"--grid {text!r}: expected section.key=value1,value2,..."])
    return key.strip(), items


def parse_setting(text: str) -> Setting:
    """``"ppo algorithm.beta1=0 algorithm.beta2=0"``: a name, then overrides."""
    name, *overrides = text.split()
    if not _NAME.match(name) or any("=" not in o for o in overrides):
        raise SweepError([f"--setting {text!r}: expected a name ([A-Za-z0-9_.=,+-]) then section.key=value ..."])
    return Setting(name, tuple(overrides))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise SweepError([f"--seeds {text!r}: expected integers, e.g. 0,1,2"]) from None
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise SweepError([f"--seeds {text!r}: expected distinct integers >= 0"])
    return seeds


def settings(grids: Sequence[str], named: Sequence[str]) -> list[Setting]:
    """Each named setting crossed with the grid's product (either may be empty)."""
    axes = [parse_grid(g) for g in grids]
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise SweepError([f"--grid names {k} twice" for k in sorted({k for k in keys if keys.count(k) > 1})])
    grid = [Setting(",".join(f"{k.rsplit('.', 1)[1]}={v}" for k, v in zip(keys, combo)),
                    tuple(f"{k}={v}" for k, v in zip(keys, combo)))
            for combo in itertools.product(*[values for _, values in axes])] if axes else []
    bases = [parse_setting(s) for s in named]
    if bases and grid:
        out = [Setting(f"{b.name}_{g.name}", b.overrides + g.overrides) for b in bases for g in grid]
    else:
        out = bases or grid
    if not out:
        raise SweepError(["a sweep needs --grid or --setting"])
    names = [s.name for s in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SweepError([f"two settings are named {n}" for n in duplicates])
    return out


def plan_runs(out: Path, grids: Sequence[str], named: Sequence[str], seeds: Sequence[int],
              common: Sequence[str]) -> list[SweepRun]:
    """Every run in order: seed by seed, every setting at each (so that a sweep cut short has
    compared every setting on the same seeds). A run's overrides: the common ones, then its
    setting's, then its seed and run directory (which the sweep owns)."""
    owned = [o for o in common if o.split("=", 1)[0].strip() in ("trainer.seed", "trainer.run_dir")]
    if owned:
        raise SweepError([f"override {o!r}: a sweep sets each run's seed (--seeds) and run directory (--out)"
                          for o in owned])
    runs = []
    chosen = settings(grids, named)
    for seed in seeds:
        for setting in chosen:
            run_dir = Path(out) / setting.name / f"seed{seed}"
            overrides = (*common, *setting.overrides, f"trainer.seed={seed}", f"trainer.run_dir={run_dir}")
            runs.append(SweepRun(setting, seed, run_dir, overrides))
    return runs


def run_problems(config: str, runs: Sequence[SweepRun], world_size: int) -> list[str]:
    """Every problem of every run's config and files; a problem all runs share is named once,
    one of some runs with the first run's label."""
    from megatron_cegppo.config import ConfigError, load_config, problems
    from megatron_cegppo.preflight import file_problems

    found: dict[str, list[str]] = {}
    for run in runs:
        try:
            cfg = load_config(config, list(run.overrides))
            lines = problems(cfg, world_size) + file_problems(cfg)
        except ConfigError as exc:
            lines = exc.problems
        for line in lines:
            found.setdefault(line, []).append(run.label)
    return [line if len(labels) == len(runs) else f"{labels[0]}: {line}" for line, labels in found.items()]
