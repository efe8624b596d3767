"""A fresh start in a run directory holding an earlier run's metrics (but no checkpoint) keeps
them beside under a timestamped name and starts an empty file: its step 0 is not appended after
the old run's last step."""

from __future__ import annotations

import json

from megatron_cegppo.tracking.metrics import MetricsWriter
from megatron_cegppo.trainer.run_directory import set_aside_old_metrics


def test_old_metrics_are_kept_beside_and_the_new_file_starts_empty(tmp_path, capsys):
    old = [{"step": s, "loss": 0.1} for s in range(4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    set_aside_old_metrics(tmp_path)
    kept = list(tmp_path.glob("metrics.*.jsonl"))
    assert len(kept) == 1 and [json.loads(x)["step"] for x in kept[0].read_text().splitlines()] == [0, 1, 2, 3]
    assert "kept as" in capsys.readouterr().out
    writer = MetricsWriter(tmp_path, tensorboard=False, truncate_after_step=-1)
    writer.log(0, {"loss": 0.2})
    writer.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0]
    set_aside_old_metrics(tmp_path / "absent")  # nothing there: nothing to do
