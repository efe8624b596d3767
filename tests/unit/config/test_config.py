"""Config loading, overrides and validation: every problem named, defaults from one place."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_cegppo.config import Config, ConfigError, load_config, problems, validate

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs").glob("*.yaml"))


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_come_from_the_schema():
    cfg = load_config(None)
    assert cfg == Config()
    assert (cfg.algorithm.eps_low, cfg.algorithm.eps_high, cfg.algorithm.clip_ratio_c) == (0.2, 0.2, 10.0)


def test_yaml_and_dotted_overrides(tmp_path):
    path = write(tmp_path, "algorithm:\n  beta1: 0.5\nparallel:\n  tensor: 2\n")
    cfg = load_config(path, ["algorithm.beta1=0.75", "rollout.stop=['</s>']", "optim.lr=1e-6"])
    assert cfg.algorithm.beta1 == 0.75 and cfg.parallel.tensor == 2
    assert cfg.rollout.stop == ["</s>"] and cfg.optim.lr == 1e-6


@pytest.mark.parametrize("text,override,match", [
    ("algorithm:\n  beta3: 1\n", None, "unknown key algorithm.beta3"),
    ("algoritm:\n  beta1: 1\n", None, "unknown key algoritm"),
    ("algorithm:\n  beta1: high\n", None, "algorithm.beta1: expected float"),
    ("parallel:\n  tensor: 2.5\n", None, "parallel.tensor: expected int"),
    ("algorithm: 3\n", None, "algorithm: expected a mapping, got 3"),
    ("", "algorithm.beta1", "must look like section.key=value"),
    ("model: [\n", None, "not valid YAML"),
])
def test_bad_files_and_overrides_are_named(tmp_path, text, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text), [override] if override else [])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def valid(**overrides):
    cfg = load_config(None, ["model.path=m", "data.train_path=d.jsonl"] + [f"{k}={v}" for k, v in overrides.items()])
    return cfg


@pytest.mark.parametrize("override,world,match", [
    ({"algorithm.beta1": -0.1}, None, "algorithm.beta1 must be >= 0, got -0.1"),
    ({"algorithm.clip_ratio_c": 1.0}, None, "clip_ratio_c must be > 1"),
    ({"algorithm.loss": "reinforce"}, None, "algorithm.loss"),
    ({"algorithm.loss_agg_mode": "mean"}, None, "loss_agg_mode"),
    ({"parallel.tensor": 2, "parallel.pipeline": 2}, 6, "not a multiple of tensor x pipeline"),
    ({"rollout.tensor_parallel": 4}, 2, "rollout.tensor_parallel"),
    ({"parallel.sequence_parallel": True}, None, "sequence_parallel needs parallel.tensor > 1"),
    ({"algorithm.prompts_per_step": 30, "algorithm.minibatches": 4}, None, "must divide into 4 mini-batches"),
    ({"algorithm.micro_batch_size": 48}, 1, "micro_batch_size=48"),
    ({"rollout.temperature": 0}, None, "temperature must be > 0"),
    ({"optim.schedule": "linear"}, None, "optim.schedule"),
    ({"optim.lr": "inf"}, None, "optim.lr must be a finite number, got inf"),
    ({"algorithm.eps_high": "nan"}, None, "algorithm.eps_high must be a finite number"),
    ({"trainer.max_consecutive_nonfinite": 0}, None, "max_consecutive_nonfinite must be >= 1"),
    ({"algorithm.max_tokens_per_microbatch": 100}, None, "shorter than the longest sequence"),
    ({"trainer.device": "gpu"}, None, "trainer.device must be one of"),
])
def test_invalid_values_are_named(override, world, match):
    with pytest.raises(ConfigError, match=match):
        validate(valid(**override), world)


def test_every_problem_is_reported_at_once():
    found = problems(load_config(None, ["algorithm.beta1=-1", "algorithm.clip_ratio_c=0.5"]))
    assert len(found) == 4, found
    for part in ("model.path:", "data.train_path:", "algorithm.beta1", "algorithm.clip_ratio_c"):
        assert sum(part in line for line in found) == 1, (part, found)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert not [p for p in problems(cfg) if "required" not in p]
