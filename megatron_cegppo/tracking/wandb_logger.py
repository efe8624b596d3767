"""Weights & Biases as one more sink of the metrics records (:class:`MetricsWriter` feeds it).
The run id is kept in ``<run_dir>/wandb/run_id``: a resumed run (or a requeued job) continues the
same W&B run. The trainer's step travels as the metric ``trainer/step`` (every metric is plotted
against it), so the record before training (step -1) and steps run again after a resume are
logged as they are, where W&B's own step must only grow."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Mapping, Optional

STEP_METRIC = "trainer/step"


class WandbLogger:
    def __init__(self, run_dir: str | os.PathLike, *, project: str, name: Optional[str], tags, mode: str,
                 config: Optional[dict] = None):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("wandb.enabled needs the wandb package (pip install megatron-cegppo[wandb])") from e
        folder = Path(run_dir) / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(8)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=project, name=name or Path(run_dir).name, tags=list(tags), mode=mode,
                              dir=str(Path(run_dir)), id=run_id, resume="allow", config=config or {},
                              settings=wandb.Settings(silent=True, console="off"))
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log({**values, STEP_METRIC: step})

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # its service process ends with the run, not with the interpreter
