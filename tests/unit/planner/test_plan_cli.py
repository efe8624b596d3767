"""``megatron-cegppo plan``: a table, and exit status 0 (fits), 1 (does not fit), 2 (bad input)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_cegppo.cli import main

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


TE = ["--layers", "transformer_engine"]  # the GPU nodes' layers (not importable on this machine)


def test_plan_prints_both_phases_and_fits(capsys):
    assert main(["plan", "--config", "configs/qwen2p5_32b.yaml", *TE]) == 0
    out = capsys.readouterr().out
    for text in ("TP 8 x PP 2 x DP 2", "optimizer state", "activations, recompute full", "KV cache",
                 "generation phase", "verdict: fits"):
        assert text in out


def test_nodes_change_the_data_parallel_size(capsys):
    assert main(["plan", "--config", "configs/qwen2p5_32b.yaml", "--nodes", "8", *TE]) == 0
    assert "x DP 4" in capsys.readouterr().out


def test_does_not_fit_exits_1(capsys):
    assert main(["plan", "--config", "configs/llama3p1_70b.yaml", "--nodes", "4", *TE, "parallel.pipeline=2"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_missing_architecture_exits_2(tmp_path, capsys):
    assert main(["plan", "--config", "configs/qwen2p5_32b.yaml", f"model.architecture={tmp_path}/none.json"]) == 2
    assert "no model architecture at" in capsys.readouterr().err


def test_broken_architecture_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(["plan", "--config", "configs/qwen2p5_32b.yaml", f"model.architecture={bad}"]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_validate_names_shape_problems(capsys):
    assert main(["validate", "--config", "configs/qwen2p5_32b.yaml", "parallel.tensor=16"]) == 2
    assert "does not divide the 40 attention heads" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["deepseek_r1_distill_qwen_1p5b", "deepseek_r1_distill_qwen_7b", "qwen2p5_32b",
                                  "llama3p1_70b"])
def test_readme_shows_the_current_plan(name, capsys):
    from megatron_cegppo.config import load_config
    from megatron_cegppo.planner import make_plan, read_architecture
    from megatron_cegppo.planner.plan import GIB

    assert main(["plan", "--config", f"configs/{name}.yaml", *TE]) == 0
    readme = (ROOT / "README.md").read_text()
    assert capsys.readouterr().out.rstrip() in readme, f"README's plan of {name} is stale"
    plan = make_plan(load_config(f"configs/{name}.yaml"), read_architecture(load_config(f"configs/{name}.yaml")))
    row = next(line for line in readme.splitlines() if line.startswith(f"| `configs/{name}.yaml`"))
    assert row.endswith(f"| {plan.training_total / GIB:.1f} / {plan.generation_total / GIB:.1f} |")


def test_submit_refuses_a_config_that_does_not_fit(tmp_path, capsys):
    args = ["submit", "--config", "configs/llama3p1_70b.yaml", "--nodes", "4", "--dry-run", *TE,
            "parallel.pipeline=2", f"trainer.run_dir={tmp_path}/run"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out and "not submitted" in captured.err
    assert not (tmp_path / "run" / "cegppo.sbatch").exists()
    assert main(args[:1] + ["--force"] + args[1:]) == 0
    assert (tmp_path / "run" / "cegppo.sbatch").exists()


def test_submit_prints_the_plan_verdict(tmp_path, capsys):
    assert main(["submit", "--config", "configs/qwen2p5_32b.yaml", "--dry-run", *TE, f"trainer.run_dir={tmp_path}"]) == 0
    assert "memory plan: training" in capsys.readouterr().out


def test_plan_uses_the_importable_layers_and_says_so(capsys):
    """Without transformer-engine (this machine) the plan is of megatron's local layers, whose
    s^2 attention scores do not fit a 16k-token micro-batch; the output says which it used."""
    assert main(["plan", "--config", "configs/deepseek_r1_distill_qwen_1p5b.yaml"]) == 1
    out = capsys.readouterr().out
    assert "planned with megatron local layers (transformer-engine is not installed)" in out
    assert "DOES NOT FIT" in out
    assert main(["plan", "--config", "configs/deepseek_r1_distill_qwen_1p5b.yaml", *TE]) == 0
    assert "planned with transformer-engine layers (--layers)" in capsys.readouterr().out
