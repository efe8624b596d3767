"""Weights & Biases, offline (no network): the records MetricsWriter writes reach a W&B run in
the run directory, the record before training (step -1) included, a resumed run continues the
same W&B run, and W&B's service process ends with the run."""

from __future__ import annotations

import re

import pytest

from megatron_cegppo.tracking.metrics import MetricsWriter
from megatron_cegppo.tracking.wandb_logger import STEP_METRIC, WandbLogger

wandb = pytest.importorskip("wandb")


def _writer(run_dir, truncate=None):
    return MetricsWriter(run_dir, tensorboard=False, truncate_after_step=truncate,
                         wandb=lambda: WandbLogger(run_dir, project="tests", name="tiny", tags=["ci"], mode="offline",
                                                   config={"algorithm": {"beta1": 0.5}}))


def _logged(run_dir) -> bytes:
    """The offline runs' transaction logs (protobuf records: names and JSON values in the clear)."""
    return b"".join(p.read_bytes() for p in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")))


def test_offline_records_and_a_resume_continue_one_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    with _writer(tmp_path) as w:
        w.log(-1, {"val/aime/avg@32": 0.25})
        w.log(0, {"reward_mean": 0.5})
        w.log(1, {"reward_mean": 0.75})
    run_id = (tmp_path / "wandb" / "run_id").read_text().strip()
    with _writer(tmp_path, truncate=0) as w:  # resumed from the checkpoint of step 0: step 1 again
        w.log(1, {"reward_mean": 0.7})
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == run_id
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>, and W&B adds "-1" to a second folder started within the same second
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", n) for n in runs), runs
    logged = _logged(tmp_path)
    for name in (b"val/aime/avg@32", b"reward_mean", STEP_METRIC.encode(), b"tiny", b"beta1"):
        assert name in logged, name  # the metrics, the run's name and its config
    for value in (b"0.25", b"0.75", b"0.7", b"-1"):
        assert value in logged, value
