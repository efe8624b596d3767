"""A sweep's plan: grids multiply, named settings cross the grid, seeds go outermost, each run
in its own directory with the overrides it gets; bad arguments and every run's config
problems are named before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_cegppo.cli import main
from megatron_cegppo.sweep.plan import SweepError, parse_grid, parse_seeds, plan_runs, settings
from megatron_cegppo.testing.tiny import TINY_CONFIG


def test_a_grid_is_the_product_of_its_axes():
    found = settings(["algorithm.beta1=0,0.5", "algorithm.beta2=1,2"], [])
    assert [s.name for s in found] == ["beta1=0,beta2=1", "beta1=0,beta2=2", "beta1=0.5,beta2=1",
                                       "beta1=0.5,beta2=2"]
    assert found[1].overrides == ("algorithm.beta1=0", "algorithm.beta2=2")


def test_named_settings_alone_or_crossed_with_the_grid():
    named = ["ppo algorithm.beta1=0 algorithm.beta2=0", "dapo algorithm.eps_high=0.28"]
    assert [(s.name, s.overrides) for s in settings([], named)] == [
        ("ppo", ("algorithm.beta1=0", "algorithm.beta2=0")), ("dapo", ("algorithm.eps_high=0.28",))]
    crossed = settings(["optim.lr=1e-4,1e-3"], named)
    assert [s.name for s in crossed] == ["ppo_lr=1e-4", "ppo_lr=1e-3", "dapo_lr=1e-4", "dapo_lr=1e-3"]
    assert crossed[3].overrides == ("algorithm.eps_high=0.28", "optim.lr=1e-3")


def test_runs_go_seed_by_seed_each_in_its_folder(tmp_path):
    runs = plan_runs(tmp_path, ["algorithm.beta1=0.5,1"], [], [0, 1], ["trainer.steps=3"])
    assert [(r.setting.name, r.seed) for r in runs] == [("beta1=0.5", 0), ("beta1=1", 0), ("beta1=0.5", 1),
                                                        ("beta1=1", 1)]
    assert runs[2].run_dir == tmp_path / "beta1=0.5" / "seed1"
    assert runs[2].overrides == ("trainer.steps=3", "algorithm.beta1=0.5", "trainer.seed=1",
                                 f"trainer.run_dir={tmp_path / 'beta1=0.5' / 'seed1'}")


@pytest.mark.parametrize("call,text", [
    (lambda: parse_grid("beta1=0,1"), "expected section.key=value1"),
    (lambda: parse_grid("algorithm.beta1=0,,1"), "expected section.key=value1"),
    (lambda: parse_seeds("0,x"), "expected integers"),
    (lambda: parse_seeds("1,1"), "distinct integers >= 0"),
    (lambda: settings([], []), "needs --grid or --setting"),
    (lambda: settings(["algorithm.beta1=0", "algorithm.beta1=1"], []), "--grid names algorithm.beta1 twice"),
    (lambda: settings([], ["a x=1", "a y=2"]), "two settings are named a"),
    (lambda: settings([], ["bad/name x=1"]), "expected a name"),
    (lambda: plan_runs(Path("o"), ["a.b=1"], [], [0], ["trainer.seed=3"]), "sets each run's seed"),
])
def test_bad_arguments_are_named(call, text):
    with pytest.raises(SweepError) as e:
        call()
    assert text in str(e.value)


def test_every_runs_problems_are_named_before_anything_runs(tmp_path, capsys):
    code = main(["sweep", "--config", str(TINY_CONFIG), "--out", str(tmp_path / "out"),
                 "--grid", "algorithm.beta1=0.5,-1", "--seeds", "0", "--nproc", "2", "model.path=/nope",
                 f"data.train_path={tmp_path / 'none.jsonl'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "beta1=-1 seed 0: algorithm.beta1 must be >= 0, got -1.0" in err, err  # one run's problem, its label
    assert err.count("/nope does not exist") == 1, err  # every run's problem, once
    assert not (tmp_path / "out").exists()  # nothing written
