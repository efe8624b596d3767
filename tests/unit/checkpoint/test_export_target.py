"""``export --out`` never wipes what is not an earlier export, and ``--checkpoint`` pointed at
a folder that is not a checkpoint says so, as one line and exit 2 (before any heavy work)."""

from __future__ import annotations

import pytest

from megatron_cegppo.checkpoint.export import EXPORT_MARKER, check_export_target
from megatron_cegppo.cli import main


def test_targets_that_may_be_replaced(tmp_path):
    check_export_target(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    check_export_target(tmp_path / "empty")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / EXPORT_MARKER).write_text("{}")
    (earlier / "model.safetensors").write_text("x")
    check_export_target(earlier)


def test_a_run_directory_is_refused_unless_forced(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="not empty and not an earlier export"):
        check_export_target(run)
    check_export_target(run, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_export_target(tmp_path / "file")


def test_cli_refuses_and_keeps_the_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    code = main(["export", "--config", str(__import__("pathlib").Path(__file__).resolve().parents[3] / "configs/tiny_cpu.yaml"),
                 "--out", str(run), f"trainer.run_dir={run}", "model.path=m", "data.train_path=d.jsonl",
                 "parallel.tensor=1"])
    assert code == 2
    assert "not an earlier export" in capsys.readouterr().err
    assert (run / "metrics.jsonl").exists() and (run / "checkpoints" / "step_00000001").is_dir()
