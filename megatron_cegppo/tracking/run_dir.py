"""Run directory: the resolved config that a run was started with, written once.

A run directory is reused when a run resumes from a checkpoint. Resuming with a different
config silently mixes two experiments in one metrics file, so a config change is refused
unless asked for explicitly; the old config is then kept next to the new one.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from megatron_cegppo.fsutil import atomic_write_text

CONFIG_NAME = "config.yaml"


def _dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, each with both values (for the error message)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in list(old) + [k for k in new if k not in old]:
            name = f"{prefix}{key}"
            if key not in new:
                out.append(f"{name}: {old[key]!r} -> <missing>")
            elif key not in old:
                out.append(f"{name}: <missing> -> {new[key]!r}")
            else:
                out.extend(_diff(old[key], new[key], f"{name}."))
        return out
    if old != new:
        return [f"{prefix.rstrip('.') or '<root>'}: {old!r} -> {new!r}"]
    return []


def _backup_name(directory: Path) -> Path:
    # Microseconds keep names unique and in chronological order when sorted.
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    candidate = directory / f"config.{stamp}.yaml"
    n = 1
    while candidate.exists():  # clock went backwards or is very coarse
        candidate = directory / f"config.{stamp}-{n}.yaml"
        n += 1
    return candidate


# Settings a resumed run may change without mixing two experiments in one metrics file: how
# long and how often, where, and how the same computation is laid out or launched (layouts,
# packing, engine memory, buckets: checkpoints reshard, and packing changes speed only).
HARMLESS_PREFIXES = (
    "trainer.steps", "trainer.log_every", "trainer.save_every", "trainer.keep_checkpoints", "trainer.run_dir",
    "trainer.resume_from", "trainer.device", "trainer.allow_config_change", "trainer.max_consecutive_nonfinite",
    "trainer.start_over", "trainer.rollout_dump_",
    "parallel.", "cluster.", "model.logprob_impl", "algorithm.micro_batch_size",
    "algorithm.max_tokens_per_microbatch", "rollout.tensor_parallel", "rollout.kv_cache_bytes",
    "rollout.gpu_memory_utilization", "rollout.weight_bucket_bytes",
    "validation.",  # measured beside training, with its own seeds: the training is the same
    "wandb.",
    "model.megatron_checkpoint",  # read by a fresh start only: a resume reads the run's checkpoints
)


def result_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """``(altering, harmless)``: the differing keys, each ``key: old -> new``."""
    altering, harmless = [], []
    for change in _diff(old, new):
        key = change.split(":", 1)[0]
        (harmless if key.startswith(HARMLESS_PREFIXES) else altering).append(change)
    return altering, harmless


def prepare_run_dir(
    path: str | os.PathLike, resolved_config: dict, *, allow_config_change: bool = False
) -> Path:
    """Create the run directory and record ``resolved_config`` as ``config.yaml``.

    If the directory already holds a config.yaml that differs in a setting that alters
    results (the model, loss and algorithm, batch sizes, optimizer, data, reward, seed), this
    raises ValueError naming each difference (old -> new), unless ``allow_config_change`` is
    set. Harmless changes (:data:`HARMLESS_PREFIXES`) are accepted. Either way the old file is
    kept as ``config.<timestamp>.yaml`` beside the new one. An identical config is left
    untouched.
    """
    if not isinstance(resolved_config, dict):
        raise TypeError(f"resolved_config must be a dict, got {type(resolved_config).__name__}")
    run_dir = Path(path)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / CONFIG_NAME
    text = _dump(resolved_config)

    if config_path.exists():
        old_text = config_path.read_text(encoding="utf-8")
        old = yaml.safe_load(old_text)
        # Compare as loaded data, so key order and formatting do not count as changes.
        new = yaml.safe_load(text)
        if old == new:
            return run_dir
        altering, _ = result_changes(old, new) if isinstance(old, dict) else (["(content differs)"], [])
        if altering and not allow_config_change:
            changes = "\n  ".join(altering)
            raise ValueError(
                f"run directory {run_dir} already holds {config_path}, and the given config changes what "
                f"the run computes (existing -> given):\n  {changes}\n"
                "Use a new run directory, or set trainer.allow_config_change=true to keep the old "
                "config as config.<timestamp>.yaml and continue with the new one."
            )
        atomic_write_text(_backup_name(run_dir), old_text)

    atomic_write_text(config_path, text)
    return run_dir
