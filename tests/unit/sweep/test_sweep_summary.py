"""A sweep's summary from the runs' metrics files: per setting the mean and sample standard
deviation over seeds of each column, computed here by hand on made-up metrics; a run not
finished is left out of the numbers and named below the table; the plots are PNGs."""

from __future__ import annotations

import json
import statistics

import pytest

from megatron_cegppo.sweep.plan import plan_runs
from megatron_cegppo.sweep.runner import DONE
from megatron_cegppo.sweep.summary import summarize


def write_run(run, entropy, reward, wall, done=True):
    run.run_dir.mkdir(parents=True)
    lines = [{"step": -1, "val/x/avg@1": 0.1}]  # the record before training is not a step
    lines += [{"step": i, "entropy": e, "reward_mean": r, "quadrant/pa_lp_clipped_frac": 0.1 * i}
              for i, (e, r) in enumerate(zip(entropy, reward))]
    (run.run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run.run_dir / "sweep_wall_time.json").write_text(json.dumps({"wall_s": wall}))
    if done:
        (run.run_dir / DONE).write_text("{}")


def test_numbers_over_seeds_and_unfinished_runs(tmp_path):
    runs = plan_runs(tmp_path, ["algorithm.beta1=0.5,1"], [], [0, 1], [])
    a0, b0, a1, b1 = runs  # seed by seed
    ten = range(10)
    write_run(a0, [0.5 - 0.01 * i for i in ten], [0.1 * i for i in ten], 100.0)
    write_run(a1, [0.4 - 0.02 * i for i in ten], [0.2 + 0.05 * i for i in ten], 120.0)
    write_run(b0, [0.3] * 10, [0.5] * 10, 90.0)
    write_run(b1, [0.9] * 4, [0.9] * 4, 10.0, done=False)  # cut short: not in the numbers
    table = summarize(runs, tmp_path)
    row = table["beta1=0.5"]
    final = [0.5 - 0.09, 0.4 - 0.18]  # the last 10 % of 10 steps: the last step
    assert row["entropy_final"]["mean"] == pytest.approx(statistics.fmean(final))
    assert row["entropy_final"]["sd"] == pytest.approx(statistics.stdev(final))
    assert row["entropy_mean"]["values"] == pytest.approx([0.5 - 0.045, 0.4 - 0.09])
    assert row["reward_first"]["values"] == pytest.approx([0.0, 0.2])
    assert row["clip_pa_lp"]["mean"] == pytest.approx(0.45)
    assert row["wall_s"]["mean"] == pytest.approx(110.0)
    assert table["beta1=1"]["seeds"] == [0] and table["beta1=1"]["wall_s"]["sd"] == 0.0
    text = (tmp_path / "summary.md").read_text()
    assert "| beta1=0.5 | 2 | 0.315 ± 0.134 | 0.383 ± 0.103 |" in text, text  # 0.41, 0.22; 0.455, 0.31
    assert "Not finished yet (1 of 4 runs): beta1=1 seed 1." in text
    for plot in ("entropy.png", "reward.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


def test_in_band_share_against_the_runs_target(tmp_path):
    runs = plan_runs(tmp_path, ["algorithm.beta1=0.5,1"], [], [0], [])
    fixed, controlled = runs
    # fixed: first 10 steps at 1.0 -> target 0.8, band [0.72, 0.88]; the second half of 40
    # steps (steps 20-39) holds 0.8 for 5 steps, 0.6 for 15
    write_run(fixed, [1.0] * 20 + [0.8] * 5 + [0.6] * 15, [0.0] * 40, 1.0)
    write_run(controlled, [1.0] * 20 + [0.5] * 10 + [0.59] * 10, [0.0] * 40, 1.0)
    # the controller's own target wins over the rule: 0.55 -> band [0.495, 0.605]
    lines = [json.loads(x) for x in (controlled.run_dir / "metrics.jsonl").read_text().splitlines()]
    for x in lines[12:]:
        x["control/target"] = 0.55
    (controlled.run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    table = summarize(runs, tmp_path)
    assert table["beta1=0.5"]["in_band"]["values"] == [pytest.approx(5 / 20)]
    assert table["beta1=1"]["in_band"]["values"] == [pytest.approx(1.0)]
    assert "in band, 2nd half" in (tmp_path / "summary.md").read_text()
