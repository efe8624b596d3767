"""Per-step scalar metrics: one JSON line per step in ``metrics.jsonl`` plus TensorBoard.

The JSONL file is the record of a run (plots and analysis read it); TensorBoard is a
convenience view of the same scalars. Each line is flushed as it is written, so a crash
loses nothing already logged; at worst the line being written is cut short, which
``read_metrics`` skips and the next ``MetricsWriter`` on the same directory removes.
"""

from __future__ import annotations

import json
import math
import operator
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

from .run_dir import atomic_write_text

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "nonfinite")


def _metrics_path(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    return path if path.is_file() else path / METRICS_NAME


def _parse_lines(text: str, source: Path) -> tuple[list[dict], bool]:
    """Records and whether a cut-short last line was dropped.

    Only the last line may be broken (a write interrupted by a crash); a broken line
    anywhere else means the file is damaged, which is an error rather than a warning.
    """
    lines = text.split("\n")
    records: list[dict] = []
    dropped_tail = False
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a metrics record")
        except ValueError as err:
            if i == last:
                dropped_tail = True
                continue
            raise ValueError(f"{source}:{i + 1}: malformed metrics line: {err}") from err
        records.append(record)
    return records, dropped_tail


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All records of ``run_dir/metrics.jsonl`` (or of a given .jsonl file), in file order.

    Non-finite values come back as None, with their keys listed under ``"nonfinite"``.
    A cut-short last line is ignored with a warning. A missing file gives [].
    """
    path = _metrics_path(run_dir)
    if not path.exists():
        return []
    records, dropped_tail = _parse_lines(path.read_text(encoding="utf-8"), path)
    if dropped_tail:
        warnings.warn(f"{path}: ignoring an incomplete last line (interrupted write)", stacklevel=2)
    return records


def _to_number(key: str, value: Any) -> int | float:
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        # torch tensors and numpy scalars; .item() raises for more than one element.
        try:
            value = value.item()
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"metric {key!r} must be a scalar, got shape "
                             f"{tuple(getattr(value, 'shape', ()))}") from err
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    raise TypeError(f"metric {key!r} must be a number or a one-element tensor, "
                    f"got {type(value).__name__}")


class MetricsWriter:
    """Appends ``{"step": step, key: value, ...}`` lines to ``run_dir/metrics.jsonl``.

    ``enabled=False`` turns every method into a no-op and touches no file: only the
    reporting rank should write. ``truncate_after_step=k`` drops records with step > k
    (on a restart from the checkpoint of step k, those steps will be run again). ``wandb``: a
    zero-argument factory of a :class:`~megatron_cegppo.tracking.wandb_logger.WandbLogger`
    (called at the first record, like the files), or None.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        truncate_after_step: int | None = None,
        wandb=None,
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_NAME
        self._file = None
        self._tb = None
        self._closed = False
        self._tensorboard = tensorboard
        self._wandb_factory, self._wandb = wandb, None
        self._purge_step = None if truncate_after_step is None else truncate_after_step + 1
        if not enabled:
            return
        if self.path.exists():
            self._repair(truncate_after_step)

    def _open(self) -> None:
        """At the first record, not before: a run that fails before its first step leaves no
        empty metrics file and no TensorBoard events for a rerun to append to."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._wandb_factory is not None:
            self._wandb = self._wandb_factory()
        self._file = open(self.path, "a", encoding="utf-8")
        if self._tensorboard:
            # Imported here: it is slow to import and unused on non-reporting ranks.
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides TensorBoard events from the discarded steps as well.
            self._tb = SummaryWriter(
                log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=self._purge_step, flush_secs=30
            )

    def _repair(self, truncate_after_step: int | None) -> None:
        """Drop a cut-short last line (appending after it would corrupt the next record)
        and, if asked, the records after ``truncate_after_step``; rewritten atomically."""
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        records, dropped_tail = _parse_lines(text, self.path)
        keep = records
        if truncate_after_step is not None:
            keep = [r for r in records if r["step"] <= truncate_after_step]
        if dropped_tail:
            warnings.warn(f"{self.path}: removing an incomplete last line (interrupted write)",
                          stacklevel=3)
        if dropped_tail or len(keep) != len(records) or (text and not text.endswith("\n")):
            atomic_write_text(self.path, "".join(_encode(r) for r in keep))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError("MetricsWriter is closed")
        if self._file is None:
            self._open()
        step = operator.index(step)
        record: dict[str, Any] = {"step": step}
        nonfinite: list[str] = []
        values: dict[str, float] = {}
        for key, raw in metrics.items():
            if key in _RESERVED:
                raise ValueError(f"metric name {key!r} is reserved")
            value = _to_number(key, raw)
            values[key] = value
            if isinstance(value, float) and not math.isfinite(value):
                record[key] = None  # JSON has no NaN/Infinity
                nonfinite.append(key)
            else:
                record[key] = value
        if nonfinite:
            record["nonfinite"] = nonfinite
        self._file.write(_encode(record))
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(step, values)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _encode(record: Mapping[str, Any]) -> str:
    # allow_nan=False: a NaN that slipped through must fail here, not corrupt the file.
    return json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
