"""Bad config input: every problem of a file and its overrides named at once, each range
check naming the key and the value, and no check raising anything but ConfigError."""

from __future__ import annotations

import dataclasses
import typing
from typing import Optional

import pytest

from megatron_cegppo.config import Config, ConfigError, load_config, problems, validate
from megatron_cegppo.config.validate import RULES


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def load_problems(path=None, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    error = info.value
    assert str(error).startswith("invalid config:\n  - ")
    assert str(error).count("\n  - ") == len(error.problems)
    return error.problems


def has(found, *texts):
    """Some problem holds every text."""
    assert any(all(t in p for t in texts) for p in found), (texts, found)


# --- the loader: all at once ----------------------------------------------------------------

def test_every_type_error_and_unknown_key_at_once(tmp_path):
    path = write(tmp_path, "\n".join([
        "algorithm:", "  beta1: high", "  beta3: 1",
        "parallel:", "  tensor: 2.5",
        "rollout:", "  n: eight", "  bogus: 1",
        "trainer:", "  steps: [1]",
        "optim:", "  lr: true",
        "algoritm:", "  beta1: 1", ""]))
    found = load_problems(path, ["data.shufle=true", "cluster.nodes=two"])
    has(found, "algorithm.beta1: expected float, got 'high'")
    has(found, "unknown key algorithm.beta3")
    has(found, "parallel.tensor: expected int, got 2.5")
    has(found, "rollout.n: expected int, got 'eight'")
    has(found, "unknown key rollout.bogus")
    has(found, "trainer.steps: expected int, got [1]")
    has(found, "optim.lr: expected float, got True")
    has(found, "unknown key algoritm", "did you mean algorithm?")
    has(found, "override 'data.shufle=true'", "unknown key data.shufle", "did you mean shuffle?")
    has(found, "cluster.nodes: expected int, got 'two'")
    assert len(found) == 10, found


def test_a_section_that_is_not_a_mapping(tmp_path):
    found = load_problems(write(tmp_path, "algorithm: 3\nrollout: [1, 2]\n"))
    assert found == ["algorithm: expected a mapping, got 3", "rollout: expected a mapping, got [1, 2]"]


def test_an_optional_setting_of_the_wrong_type():
    has(load_problems(None, ["data.max_prompt_tokens=many"]), "data.max_prompt_tokens: expected int or null, got 'many'")


def test_range_problems_of_the_settings_that_parsed_come_with_type_errors(tmp_path):
    path = write(tmp_path, "optim:\n  lr: -1\n  adam_beta1: 1.5\nalgorithm:\n  beta1: high\n")
    found = load_problems(path, ["rollout.top_p=2"])
    has(found, "algorithm.beta1: expected float")
    has(found, "optim.lr must be > 0, got -1.0")
    has(found, "optim.adam_beta1 must be in [0, 1), got 1.5")
    has(found, "rollout.top_p must be in (0, 1], got 2.0")


def test_duplicated_keys_are_named_with_both_lines(tmp_path):
    path = write(tmp_path, "\n".join([
        "algorithm:",         # 1
        "  beta1: 0.5",       # 2
        "  beta1: 0.75",      # 3
        "optim:",             # 4
        "  lr: 1.0e-6",       # 5
        "algorithm:",         # 6
        "  eps_low: 0.1",     # 7
        ""]))
    found = load_problems(path)
    has(found, "algorithm.beta1 is given twice (lines 2 and 3)")
    has(found, "algorithm is given twice (lines 1 and 6)")
    assert all(p.startswith(f"{path}: ") for p in found)


def test_duplicated_keys_deeper_and_in_an_override_value(tmp_path):
    found = load_problems(None, ["rollout.stop={a: 1, a: 2}"])
    has(found, "override 'rollout.stop={a: 1, a: 2}'", "a is given twice")


def test_the_file_itself(tmp_path):
    has(load_problems(tmp_path / "nope.yaml"), "config file", "nope.yaml does not exist")
    has(load_problems(tmp_path), "is a directory")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model:\n  path: caf\xe9\n".encode("latin-1"))
    has(load_problems(bad), "is not UTF-8 text", "0xe9")
    has(load_problems(write(tmp_path, "model:\n  path: [\n")), "not valid YAML (line 3, column 1)")
    has(load_problems(write(tmp_path, "- a\n- b\n")), "the top level must be a mapping of sections, got a list")
    has(load_problems(write(tmp_path, "just text\n")), "the top level must be a mapping of sections, got a str")


def test_an_empty_file_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "# nothing\n")) == Config()


def test_a_file_problem_and_override_problems_together(tmp_path):
    found = load_problems(tmp_path / "nope.yaml", ["algorithm.beta3=1", "oops"])
    assert len(found) == 3, found


@pytest.mark.parametrize("override,texts", [
    ("algorithm.beta1", ["override 'algorithm.beta1' must look like section.key=value"]),
    ("=3", ["must look like section.key=value"]),
    ("algorithm=3", ["override 'algorithm=3' must look like section.key=value"]),
    ("algorithm..beta1=3", ["must look like section.key=value"]),
    ("rollout.stop=[", ["override 'rollout.stop=['", "the value is not valid YAML"]),
    ("algorithm.beta3=1", ["override 'algorithm.beta3=1'", "unknown key algorithm.beta3"]),
    ("algoritm.beta1=1", ["override 'algoritm.beta1=1'", "unknown key algoritm", "did you mean algorithm?"]),
    ("algorithm.beta1.x=1", ["override 'algorithm.beta1.x=1'", "algorithm.beta1 is not a section"]),
    ("algorithm.beta1=high", ["algorithm.beta1: expected float, got 'high'"]),
])
def test_bad_overrides_are_named(override, texts):
    has(load_problems(None, [override]), *texts)


def test_an_override_still_applies_next_to_a_bad_one(tmp_path):
    found = load_problems(None, ["algorithm.beta3=1", "algorithm.beta1=x"])
    assert len(found) == 2


def test_overrides_of_a_section_the_file_gives_wrongly_are_named_once(tmp_path):
    found = load_problems(write(tmp_path, "algorithm: 3\n"), ["algorithm.beta1=0.5"])
    assert found == ["algorithm: expected a mapping, got 3"]


# --- validate: each setting -------------------------------------------------------------------

def valid(*overrides):
    return load_config(None, ["model.path=m", "data.train_path=d.jsonl", *overrides])


@pytest.mark.parametrize("key,value,text", [
    ("optim.lr", "0", "optim.lr must be > 0, got 0.0"),
    ("optim.lr", "-1e-6", "optim.lr must be > 0, got -1e-06"),
    ("optim.min_lr", "-1", "optim.min_lr must be >= 0, got -1.0"),
    ("optim.adam_beta1", "1", "optim.adam_beta1 must be in [0, 1), got 1.0"),
    ("optim.adam_beta2", "-0.1", "optim.adam_beta2 must be in [0, 1), got -0.1"),
    ("optim.adam_eps", "0", "optim.adam_eps must be > 0, got 0.0"),
    ("optim.weight_decay", "-0.01", "optim.weight_decay must be >= 0, got -0.01"),
    ("optim.grad_clip", "-1", "optim.grad_clip must be >= 0, got -1.0"),
    ("optim.warmup_steps", "-1", "optim.warmup_steps must be >= 0, got -1"),
    ("rollout.tensor_parallel", "0", "rollout.tensor_parallel must be >= 1, got 0"),
    ("rollout.n", "0", "rollout.n must be >= 1, got 0"),
    ("rollout.temperature", "-1", "rollout.temperature must be > 0, got -1.0"),
    ("rollout.top_p", "0", "rollout.top_p must be in (0, 1], got 0.0"),
    ("rollout.top_p", "1.5", "rollout.top_p must be in (0, 1], got 1.5"),
    ("rollout.max_tokens", "0", "rollout.max_tokens must be >= 1, got 0"),
    ("rollout.max_model_len", "0", "rollout.max_model_len must be >= 1, got 0"),
    ("rollout.kv_cache_bytes", "0", "rollout.kv_cache_bytes must be >= 1, got 0"),
    ("rollout.gpu_memory_utilization", "0", "rollout.gpu_memory_utilization must be in (0, 1], got 0.0"),
    ("rollout.gpu_memory_utilization", "1.2", "rollout.gpu_memory_utilization must be in (0, 1], got 1.2"),
    ("rollout.weight_bucket_bytes", "0", "rollout.weight_bucket_bytes must be >= 1, got 0"),
    ("rollout.stop", "[1, 2]", "rollout.stop must be a list of non-empty strings, got [1, 2]"),
    ("rollout.stop", "['']", "rollout.stop must be a list of non-empty strings, got ['']"),
    ("trainer.steps", "0", "trainer.steps must be >= 1, got 0"),
    ("trainer.log_every", "0", "trainer.log_every must be >= 1, got 0"),
    ("trainer.save_every", "-1", "trainer.save_every must be >= 0, got -1"),
    ("trainer.keep_checkpoints", "0", "trainer.keep_checkpoints must be >= 1, got 0"),
    ("trainer.seed", "-1", "trainer.seed must be in [0, 4294967295], got -1"),
    ("trainer.seed", str(2**32), "trainer.seed must be in [0, 4294967295], got 4294967296"),
    ("trainer.run_dir", "''", "trainer.run_dir must be a non-empty string, got ''"),
    ("trainer.resume_from", "''", "trainer.resume_from must be a non-empty string when set, got ''"),
    ("trainer.max_consecutive_nonfinite", "0", "trainer.max_consecutive_nonfinite must be >= 1, got 0"),
    ("algorithm.eps_low", "1", "algorithm.eps_low must be in [0, 1), got 1.0"),
    ("algorithm.eps_high", "-0.1", "algorithm.eps_high must be >= 0, got -0.1"),
    ("algorithm.beta2", "-1", "algorithm.beta2 must be >= 0, got -1.0"),
    ("algorithm.clip_ratio_c", "0.5", "algorithm.clip_ratio_c must be > 1, got 0.5"),
    ("algorithm.tis_cap", "0", "algorithm.tis_cap must be > 0 when set, got 0.0"),
    ("algorithm.kl_coeff", "-1", "algorithm.kl_coeff must be >= 0, got -1.0"),
    ("algorithm.entropy_coeff", "-1", "algorithm.entropy_coeff must be >= 0, got -1.0"),
    ("algorithm.positive_loss_coeff", "-0.1", "algorithm.positive_loss_coeff must be >= 0, got -0.1"),
    ("algorithm.prompts_per_round", "0", "algorithm.prompts_per_round must be >= 1 when set, got 0"),
    ("algorithm.short_batch", "pad", "algorithm.short_batch must be one of ['fill', 'shrink'], got 'pad'"),
    ("algorithm.max_sampling_rounds", "0", "algorithm.max_sampling_rounds must be >= 1, got 0"),
    ("algorithm.prompts_per_step", "0", "algorithm.prompts_per_step must be >= 1, got 0"),
    ("algorithm.minibatches", "0", "algorithm.minibatches must be >= 1, got 0"),
    ("algorithm.epochs", "0", "algorithm.epochs must be >= 1, got 0"),
    ("algorithm.micro_batch_size", "0", "algorithm.micro_batch_size must be >= 1, got 0"),
    ("algorithm.max_tokens_per_microbatch", "0", "algorithm.max_tokens_per_microbatch must be >= 1 when set, got 0"),
    ("data.prompt_key", "''", "data.prompt_key must be a non-empty string, got ''"),
    ("data.answer_key", "' '", "data.answer_key must be a non-empty string, got ' '"),
    ("data.max_prompt_tokens", "0", "data.max_prompt_tokens must be >= 1 when set, got 0"),
    ("data.truncation", "middle", "data.truncation must be one of ['error', 'left', 'right'], got 'middle'"),
    ("reward.name", "''", "reward.name must be a non-empty string, got ''"),
    ("wandb.mode", "cloud", "wandb.mode must be one of ['online', 'offline'], got 'cloud'"),
    ("wandb.tags", "[1]", "wandb.tags must be a list of non-empty strings, got [1]"),
    ("trainer.rollout_dump_every", "-1", "trainer.rollout_dump_every must be >= 0, got -1"),
    ("validation.every", "-2", "validation.every must be >= 0, got -2"),
    ("cluster.nodes", "0", "cluster.nodes must be >= 1, got 0"),
    ("cluster.gpus_per_node", "-1", "cluster.gpus_per_node must be >= 0, got -1"),
    ("cluster.gpu_memory_gib", "0", "cluster.gpu_memory_gib must be > 0, got 0.0"),
    ("parallel.tensor", "0", "parallel.tensor must be >= 1, got 0"),
    ("parallel.pipeline", "-1", "parallel.pipeline must be >= 1, got -1"),
    ("parallel.virtual_pipeline", "1", "parallel.virtual_pipeline must be >= 2 when set, got 1"),
    ("parallel.recompute", "some", "parallel.recompute must be one of ['none', 'selective', 'full'], got 'some'"),
    ("model.dtype", "float16", "model.dtype must be one of ['float32', 'bfloat16'], got 'float16'"),
    ("model.logprob_impl", "slow", "model.logprob_impl must be one of ['fused', 'logits'], got 'slow'"),
])
def test_each_setting_out_of_range_is_named_with_its_value(key, value, text):
    found = problems(valid(f"{key}={value}"))
    assert text in found, found


def _float_settings():
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        for name, hint in typing.get_type_hints(hints[section.name]).items():
            if hint in (float, Optional[float]):
                yield f"{section.name}.{name}"


@pytest.mark.parametrize("key", list(_float_settings()))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_setting_must_be_finite(key, value):
    found = problems(valid(f"{key}={value}"))
    assert f"{key} must be a finite number, got {float(value)}" in found, found
    assert sum(key in p for p in found) == 1, found  # not also "must be > 0, got nan"


def test_settings_that_depend_on_one_another():
    has(problems(valid("optim.lr=1e-6", "optim.min_lr=1e-5")), "optim.min_lr (1e-05) must be <= optim.lr (1e-06)")
    has(problems(valid("rollout.max_tokens=64", "rollout.max_model_len=64")),
        "rollout.max_model_len (64) must exceed rollout.max_tokens (64)")
    has(problems(valid("data.max_prompt_tokens=1024")), "data.max_prompt_tokens (1024) must be < rollout.max_model_len (1024)")
    assert problems(valid("data.max_prompt_tokens=768", "data.truncation=left")) == []
    has(problems(valid("parallel.virtual_pipeline=2")), "parallel.virtual_pipeline (2) needs parallel.pipeline >= 2, got 1")
    has(problems(valid("rollout.n=1")), "rollout.n must be >= 2 for group advantages")
    assert problems(valid("rollout.n=1", "algorithm.dynamic_sampling=false")) == []
    has(problems(valid("algorithm.prompts_per_step=8", "algorithm.minibatches=2", "algorithm.prompts_per_round=3")),
        "algorithm.prompts_per_round=3 is less than one mini-batch of 4 groups")
    assert problems(valid("algorithm.prompts_per_step=8", "algorithm.minibatches=2", "algorithm.prompts_per_round=16",
                          "algorithm.short_batch=shrink")) == []


def test_a_bad_setting_gives_one_message_not_a_chain():
    """A cross check is skipped where one of its settings is already named."""
    found = problems(valid("rollout.max_tokens=0"))
    assert found == ["rollout.max_tokens must be >= 1, got 0"], found


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("override", ["rollout.tensor_parallel=0", "algorithm.minibatches=0", "parallel.tensor=0",
                                      "parallel.pipeline=0", "rollout.n=0", "algorithm.micro_batch_size=0",
                                      "algorithm.prompts_per_step=0"])
def test_zeros_never_divide(override, world):
    """rollout.tensor_parallel=0 was a ZeroDivisionError inside validate."""
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        validate(valid(override), world)


@pytest.mark.parametrize("world", [0, -2])
def test_a_world_size_below_one(world):
    assert problems(valid(), world) == [f"world size must be >= 1, got {world}"]


def _every_setting(section=None, prefix=""):
    """Dotted keys of every setting, subsections' included."""
    section = Config() if section is None else section
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from _every_setting(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


@pytest.mark.parametrize("key", list(_every_setting()))
@pytest.mark.parametrize("value", [0, -1, float("nan"), "x", None, [], 10**30])
def test_problems_never_raise(key, value):
    """Whatever a setting holds (code may set one by hand), problems() returns messages."""
    cfg = valid()
    *path, name = key.split(".")
    owner = cfg
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, name, value)
    for world in (None, 1, 3, 16):
        assert isinstance(problems(cfg, world), list)


def test_a_value_of_another_type_set_by_code_is_named():
    cfg = valid()
    cfg.rollout.n = "8"
    has(problems(cfg), "rollout.n must be >= 1, got '8'")


def test_the_defaults_with_the_required_paths_are_valid():
    assert problems(valid()) == []
    assert problems(valid(), 1) == []


def test_every_setting_with_a_range_has_a_rule():
    """A new numeric setting gets a range here too."""
    def numeric(section, prefix=""):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                yield from numeric(value, f"{prefix}{f.name}.")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                yield f"{prefix}{f.name}"

    found = set(numeric(Config()))
    assert "algorithm.entropy_control.kp" in found  # subsections too
    assert found <= set(RULES), sorted(found - set(RULES))


def test_entropy_control_settings():
    on = "algorithm.entropy_control.enabled=true"
    assert problems(valid(on)) == []
    has(problems(valid(on, "algorithm.loss=ppo")), "only algorithm.loss=cegppo has", "'ppo'")
    has(problems(valid(on, "algorithm.beta1=0")),
        "algorithm.beta1 (0.0) must lie within [beta1_min, beta1_max] = [0.25, 1.0]")
    has(problems(valid(on, "algorithm.entropy_control.beta2_max=0.8")),
        "algorithm.beta2 (1.0) must lie within [beta2_min, beta2_max] = [0.5, 0.8]")
    has(problems(valid(on, "algorithm.entropy_control.beta1_min=1.5")),
        "algorithm.entropy_control: beta1_min (1.5) must be <= beta1_max (1.0)")
    has(problems(valid(on, "algorithm.entropy_control.beta2_min=0")),
        "algorithm.entropy_control.beta2_min must be > 0")
    has(problems(valid(on, "algorithm.entropy_control.smoothing=1")),
        "algorithm.entropy_control.smoothing must be in [0, 1)")
    assert problems(valid(on, "algorithm.entropy_control.smoothing=0")) == []
    # the shared bounds of before are gone: an old config naming them is refused
    with pytest.raises(ConfigError, match="unknown key algorithm.entropy_control.beta_min"):
        valid(on, "algorithm.entropy_control.beta_min=0.05")
    has(problems(valid(on, "algorithm.entropy_control.kp=0", "algorithm.entropy_control.ki=0")), "never move")
    has(problems(valid(on, "algorithm.entropy_control.band=1.5")), "algorithm.entropy_control.band must be")
    assert problems(valid("algorithm.beta1=0")) == []  # off: PPO-like betas are fine
