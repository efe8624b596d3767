"""Run tracking: run dir/config, metrics.jsonl + TensorBoard, plots, progress, PhaseTimer."""

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
import yaml

from megatron_cegppo.tracking import (
    MetricsWriter,
    PhaseTimer,
    atomic_write_text,
    prepare_run_dir,
    progress,
    read_metrics,
)
from megatron_cegppo.tracking.plots import main as plots_main
from megatron_cegppo.tracking.plots import plot_run, rolling_mean

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _strict_json(line):
    """json.loads that refuses the NaN/Infinity tokens Python accepts by default."""
    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=reject)


def _tmp_files(directory):
    return [p.name for p in directory.rglob("*.tmp")]


# ---------------------------------------------------------------- run dir / config


def test_prepare_run_dir_writes_config(tmp_path):
    cfg = {"model": {"name": "tiny", "layers": 2}, "lr": 1e-6, "seed": 3}
    run = prepare_run_dir(tmp_path / "a" / "run", cfg)
    assert run == tmp_path / "a" / "run"
    text = (run / "config.yaml").read_text()
    assert yaml.safe_load(text) == cfg
    assert text.index("model") < text.index("lr") < text.index("seed")  # sort_keys=False
    assert (run / "config.yaml").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert _tmp_files(run) == []


def test_prepare_run_dir_same_config_is_noop(tmp_path):
    cfg = {"a": 1, "b": {"c": [1, 2]}}
    prepare_run_dir(tmp_path, cfg)
    prepare_run_dir(tmp_path, {"b": {"c": [1, 2]}, "a": 1})  # key order does not matter
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_prepare_run_dir_refuses_changed_config(tmp_path):
    prepare_run_dir(tmp_path, {"lr": 1e-6, "loss": {"eps_low": 0.2}})
    with pytest.raises(ValueError) as err:
        prepare_run_dir(tmp_path, {"lr": 2e-6, "loss": {"eps_low": 0.2}})
    msg = str(err.value)
    assert str(tmp_path / "config.yaml") in msg
    assert "lr" in msg and "1e-06" in msg and "2e-06" in msg
    assert "allow_config_change" in msg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["lr"] == 1e-6


def test_prepare_run_dir_allow_change_keeps_old(tmp_path):
    prepare_run_dir(tmp_path, {"lr": 1})
    prepare_run_dir(tmp_path, {"lr": 2}, allow_config_change=True)
    prepare_run_dir(tmp_path, {"lr": 3}, allow_config_change=True)  # both older configs kept
    backups = sorted(p for p in tmp_path.glob("config.*.yaml"))
    assert [yaml.safe_load(p.read_text())["lr"] for p in backups] == [1, 2]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"lr": 3}
    assert _tmp_files(tmp_path) == []


def test_atomic_write_failure_leaves_old_file_and_no_tmp(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    atomic_write_text(target, "old\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


# ---------------------------------------------------------------- metrics.jsonl


def test_metrics_round_trip(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(0, {"loss": 0.5, "n_tokens": 128, "kl": torch.tensor(0.25)})
        w.log(1, {"loss": torch.tensor([1.5], dtype=torch.float64), "acc": np.float32(0.75),
                  "n": torch.tensor(7)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert [_strict_json(line) for line in lines] == read_metrics(tmp_path)
    assert read_metrics(tmp_path) == [
        {"step": 0, "loss": 0.5, "n_tokens": 128, "kl": 0.25},
        {"step": 1, "loss": 1.5, "acc": 0.75, "n": 7},
    ]
    assert read_metrics(tmp_path / "metrics.jsonl") == read_metrics(tmp_path)


def test_metrics_writer_touches_nothing_before_its_first_record(tmp_path):
    """A run that fails before its first step leaves no empty metrics file or TensorBoard
    events behind for a rerun to append to."""
    run_dir = tmp_path / "run"
    writer = MetricsWriter(run_dir)
    writer.close()
    assert not run_dir.exists()
    writer = MetricsWriter(run_dir)
    writer.log(0, {"loss": 1.0})
    writer.close()
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 1
    assert list((run_dir / "tensorboard").iterdir())
    with pytest.raises(RuntimeError, match="closed"):
        writer.log(1, {"loss": 1.0})


def test_metrics_each_line_is_on_disk_before_close(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.log(0, {"loss": 1.0})
    assert read_metrics(tmp_path) == [{"step": 0, "loss": 1.0}]  # flushed, not buffered
    w.close()


def test_metrics_nonfinite_written_as_null(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(0, {"a": float("nan"), "b": 1.0, "c": torch.tensor(float("inf")),
                  "d": -math.inf})
        w.log(1, {"a": 2.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [_strict_json(line) for line in lines]  # every line is standard JSON
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]
    assert records[0] == {"step": 0, "a": None, "b": 1.0, "c": None, "d": None,
                          "nonfinite": ["a", "c", "d"]}
    assert records[1] == {"step": 1, "a": 2.0}


def test_metrics_rejects_bad_input(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError):
            w.log(0, {"step": 1.0})
        with pytest.raises(ValueError):
            w.log(0, {"x": torch.ones(3)})
        with pytest.raises(TypeError):
            w.log(0, {"x": "high"})
        with pytest.raises(TypeError):
            w.log(1.5, {"x": 1.0})
    assert read_metrics(tmp_path) == []  # nothing half-written


def test_truncated_last_line_tolerated_and_repaired(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(3):
            w.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.12')  # crash mid-write
    with pytest.warns(UserWarning, match="incomplete last line"):
        records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2]

    # Resuming must not glue the next record onto the broken line.
    with pytest.warns(UserWarning, match="incomplete last line"):
        w = MetricsWriter(tmp_path, tensorboard=False)
    w.log(3, {"loss": 3.0})
    w.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
    assert _tmp_files(tmp_path) == []


def test_corrupt_middle_line_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "x\n{"step": 2}\n')
    with pytest.raises(ValueError, match=":2: malformed"):
        read_metrics(tmp_path)


def test_truncate_after_step(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(10):
            w.log(step, {"loss": float(step)})
    with MetricsWriter(tmp_path, tensorboard=False, truncate_after_step=4) as w:
        assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]
        w.log(5, {"loss": 50.0})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert records[-1]["loss"] == 50.0
    assert _tmp_files(tmp_path) == []


def test_disabled_writer_touches_nothing(tmp_path):
    run = tmp_path / "rank1"
    w = MetricsWriter(run, enabled=False, truncate_after_step=0)
    w.log(0, {"loss": 1.0})
    w.close()
    assert not run.exists()
    assert read_metrics(run) == []


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path) as w:
        w.log(1, {"reward_mean": 0.5, "quadrant/pa_hp_frac": torch.tensor(0.25)})
        w.log(2, {"reward_mean": 0.75})
    tb_dir = tmp_path / "tensorboard"
    assert list(tb_dir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"reward_mean", "quadrant/pa_hp_frac"}
    assert [(e.step, e.value) for e in acc.Scalars("reward_mean")] == [(1, 0.5), (2, 0.75)]
    assert [(e.step, e.value) for e in acc.Scalars("quadrant/pa_hp_frac")] == [(1, 0.25)]


# ---------------------------------------------------------------- plots


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5000


def test_plots_only_for_present_keys(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(12):
            w.log(step, {
                "reward_mean": 0.1 * step if step != 4 else float("nan"),
                "entropy": 1.0 - 0.05 * step,
                "clipfrac_low": 0.01, "clipfrac_high": 0.02,
                "loss": 0.3,
            })
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["reward.png", "entropy.png", "clipping.png"]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        _assert_png(path)
    assert not (tmp_path / "plots" / "quadrants.png").exists()


def test_plots_quadrants_and_selected_keys(tmp_path):
    quadrants = ["quadrant/pa_hp_frac", "quadrant/pa_lp_frac",
                 "quadrant/na_hp_frac", "quadrant/na_lp_frac"]
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(6):
            w.log(step, {**{k: 0.25 for k in quadrants}, "entropy": 1.0, "loss/policy": 0.1})
    out = tmp_path / "figs"
    paths = plot_run(tmp_path, keys=["quadrant/pa_hp_frac", "loss/policy", "absent"],
                     out_dir=out)
    assert [p.name for p in paths] == ["quadrants.png", "loss_policy.png"]
    for path in paths:
        _assert_png(path)


def test_plots_cli(tmp_path, capsys):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(0, {"entropy": 1.0})
        w.log(1, {"entropy": 0.9})
    assert plots_main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "plots" / "entropy.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plots_main([str(empty)]) == 1


def test_rolling_mean():
    assert rolling_mean([1.0, 3.0, 5.0], window=2) == [1.0, 2.0, 4.0]
    out = rolling_mean([1.0, math.nan, 3.0, math.nan], window=5)
    assert out == [1.0, 1.0, 2.0, 2.0]


# ---------------------------------------------------------------- progress / timing


def test_phase_timer_sums():
    ticks = iter([0.0, 1.5, 10.0, 10.25, 20.0, 23.0, 30.0, 30.5])
    timer = PhaseTimer(clock=lambda: next(ticks))
    with timer.phase("generate"):
        pass
    with timer.phase("train"):
        pass
    with timer.phase("generate"):
        pass
    with pytest.raises(RuntimeError):
        with timer.phase("train"):
            raise RuntimeError("boom")  # still counted
    assert timer.summary() == {"time/generate": 4.5, "time/train": 0.75}
    timer.reset()
    assert timer.summary() == {}


def test_phase_timer_real_clock():
    timer = PhaseTimer()
    with timer.phase("x"):
        pass
    assert 0.0 <= timer.summary()["time/x"] < 1.0


def test_progress_silencing(monkeypatch):
    monkeypatch.delenv("CEGPPO_PROGRESS", raising=False)
    assert list(progress(range(3), desc="x", enabled=False)) == [0, 1, 2]
    assert progress(range(3), desc="x", enabled=False).disable
    assert not progress(range(3), desc="x", enabled=True).disable

    # pytest captures stderr, so it is not a TTY here.
    monkeypatch.setenv("CEGPPO_PROGRESS", "0")
    bar = progress(5, desc="steps", enabled=True)
    assert bar.disable and bar.total == 5
    bar.update(2)
    bar.close()


def test_resume_config_changes_that_alter_results_are_refused(tmp_path):
    """A changed loss, batch size or temperature mixes two experiments; more steps, another
    layout or packing do not."""
    from megatron_cegppo.config import load_config, to_dict

    base = load_config("configs/tiny_cpu.yaml")
    prepare_run_dir(tmp_path, to_dict(base))
    harmless = load_config("configs/tiny_cpu.yaml", ["trainer.steps=800", "parallel.tensor=1",
                                                     "algorithm.max_tokens_per_microbatch=64"])
    prepare_run_dir(tmp_path, to_dict(harmless))
    assert len(list(tmp_path.glob("config.*.yaml"))) == 1  # the old one kept beside
    for override, key in (("algorithm.beta1=0.75", "algorithm.beta1"), ("rollout.temperature=0.6", "rollout.temperature"),
                          ("algorithm.prompts_per_step=16", "algorithm.prompts_per_step"), ("trainer.seed=3", "trainer.seed")):
        changed = load_config("configs/tiny_cpu.yaml", ["trainer.steps=800", "parallel.tensor=1",
                                                        "algorithm.max_tokens_per_microbatch=64", override])
        with pytest.raises(ValueError, match=key):
            prepare_run_dir(tmp_path, to_dict(changed))
    allowed = load_config("configs/tiny_cpu.yaml", ["algorithm.beta1=0.75", "trainer.allow_config_change=true"])
    prepare_run_dir(tmp_path, to_dict(allowed), allow_config_change=True)
