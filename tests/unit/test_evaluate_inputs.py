"""eval's own files are checked up front: its prompt file, not the config's training file."""

from __future__ import annotations

import json

from megatron_cegppo.config import Config
from megatron_cegppo.evaluate import input_problems


def test_the_eval_file_is_checked_and_the_training_file_is_not(tmp_path):
    cfg = Config()
    cfg.data.train_path = str(tmp_path / "missing_train.jsonl")
    cfg.reward.name = "arithmetic"
    bad = tmp_path / "eval.jsonl"
    bad.write_text("not json\n")
    found = input_problems(cfg, str(bad))
    assert len(found) == 1 and str(bad) in found[0] and "invalid JSON" in found[0]
    assert cfg.data.train_path == str(tmp_path / "missing_train.jsonl")  # the run's config is left alone


def test_a_good_eval_file_and_the_model_folder(tmp_path):
    cfg = Config()
    cfg.model.path, cfg.reward.name = str(tmp_path / "no_model"), "arithmetic"
    good = tmp_path / "eval.jsonl"
    good.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    assert input_problems(cfg, str(good)) == [f"model.path: {tmp_path / 'no_model'} does not exist "
                                              "(an HF folder: config.json, *.safetensors, tokenizer)"]
