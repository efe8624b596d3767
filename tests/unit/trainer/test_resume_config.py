"""A checkpoint saved under a config that alters results is refused at resume, naming each
difference, before anything is loaded; harmless changes pass, and trainer.allow_config_change
lets a user who means it go on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_cegppo.config import ConfigError, load_config, to_dict
from megatron_cegppo.trainer.checkpointing import TrainerCheckpoints


def _checkpoints(tmp_path, *overrides):
    cfg = load_config(None, [f"trainer.run_dir={tmp_path}", *overrides])
    return TrainerCheckpoints(cfg.trainer, SimpleNamespace(rank=0, world=1)), to_dict(cfg)


def test_a_result_altering_change_is_refused_naming_it(tmp_path):
    checkpoints, given = _checkpoints(tmp_path, "algorithm.beta1=0.75", "trainer.steps=50")
    _, saved = _checkpoints(tmp_path)
    with pytest.raises(ConfigError) as err:
        checkpoints._check_config(tmp_path / "step_00000003", saved, given)
    text = str(err.value)
    assert "step_00000003 was saved by a run whose config differs" in text and "algorithm.beta1: 0.5 -> 0.75" in text
    assert "trainer.steps" not in text  # harmless: not named


def test_harmless_changes_and_an_explicit_allowance_pass(tmp_path):
    checkpoints, given = _checkpoints(tmp_path, "trainer.steps=50", "parallel.tensor=2",
                                      "model.megatron_checkpoint=/moved/sft")  # read by fresh starts only
    _, saved = _checkpoints(tmp_path)
    checkpoints._check_config(tmp_path, saved, given)
    checkpoints, given = _checkpoints(tmp_path, "algorithm.beta1=0.75", "trainer.allow_config_change=true")
    checkpoints._check_config(tmp_path, saved, given)
