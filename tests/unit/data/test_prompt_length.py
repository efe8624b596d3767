"""Prompts longer than the model allows: refused at load with the count and the longest, or cut
from the left or the right as data.truncation says; the limit from data.max_prompt_tokens or
what rollout.max_model_len leaves beside rollout.max_tokens; applied in evaluate."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from megatron_cegppo.config import Config
from megatron_cegppo.data.prompts import DataError, fit_prompt_lengths, prompt_token_limit, tokenize_prompts

PROMPTS = [[1, 2, 3], [1, 2, 3, 4, 5, 6], [7] * 4, [9] * 9]


def test_prompt_token_limit():
    cfg = Config()
    cfg.rollout.max_model_len, cfg.rollout.max_tokens = 1024, 256
    assert prompt_token_limit(cfg) == 768
    cfg.data.max_prompt_tokens = 100
    assert prompt_token_limit(cfg) == 100


def test_error_names_the_count_the_longest_and_the_fix():
    with pytest.raises(DataError) as info:
        fit_prompt_lengths(PROMPTS, max_prompt_tokens=4, truncation="error", source="p.jsonl")
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert message.startswith("p.jsonl: 2 of 4 prompts are longer than 4 tokens")
    assert "the longest is record 4 with 9 tokens" in message
    for fix in ("data.truncation=left or right", "rollout.max_model_len", "rollout.max_tokens", "data.max_prompt_tokens"):
        assert fix in message


def test_within_the_limit_is_unchanged():
    fitted = fit_prompt_lengths(PROMPTS, max_prompt_tokens=9, truncation="error")
    assert fitted.token_ids == PROMPTS and fitted.truncated == 0 and fitted.message == ""


def test_left_keeps_the_last_tokens():
    fitted = fit_prompt_lengths(PROMPTS, max_prompt_tokens=4, truncation="left", source="p.jsonl")
    assert fitted.token_ids == [[1, 2, 3], [3, 4, 5, 6], [7] * 4, [9] * 4]
    assert fitted.truncated == 2
    assert fitted.message == "p.jsonl: 2 of 4 prompts truncated to their last 4 tokens (data.truncation=left)"


def test_right_keeps_the_first_tokens():
    fitted = fit_prompt_lengths(PROMPTS, max_prompt_tokens=4, truncation="right")
    assert fitted.token_ids == [[1, 2, 3], [1, 2, 3, 4], [7] * 4, [9] * 4]
    assert fitted.truncated == 2 and "their first 4 tokens" in fitted.message


def test_bad_arguments():
    with pytest.raises(ValueError, match="data.truncation must be one of"):
        fit_prompt_lengths(PROMPTS, max_prompt_tokens=4, truncation="middle")
    with pytest.raises(ValueError, match="limit must be >= 1, got 0"):
        fit_prompt_lengths(PROMPTS, max_prompt_tokens=0, truncation="left")


class CharTokenizer:
    """One token per character; a chat template that wraps the prompt in ``<u>``...``<a>``."""

    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return ([0] if add_special_tokens else []) + [ord(c) for c in text]

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return f"<u>{messages[0]['content']}<a>"


def test_tokenize_prompts_applies_the_config():
    cfg = Config()
    cfg.rollout.max_model_len, cfg.rollout.max_tokens = 12, 4  # 8 prompt tokens
    records = [{"prompt": "abc", "answer": "1"}, {"prompt": "abcdefghij", "answer": "2"}]
    with pytest.raises(DataError, match=r"1 of 2 prompts are longer than 8 tokens .*; the longest is record 2 with 11 tokens"):
        tokenize_prompts(CharTokenizer(), records, cfg, source="p.jsonl")
    cfg.data.truncation = "left"
    fitted = tokenize_prompts(CharTokenizer(), records, cfg, source="p.jsonl")
    assert fitted.token_ids == [[0, 97, 98, 99], [ord(c) for c in "cdefghij"]]
    tok = CharTokenizer()
    tok.chat_template = "{{ messages }}"  # templated: no special tokens added, the template counts
    cfg.data.truncation, cfg.data.max_prompt_tokens = "right", 5
    assert tokenize_prompts(tok, records[:1], cfg, source="p").token_ids == [[ord(c) for c in "<u>ab"]]


def test_evaluate_refuses_long_prompts_before_the_engine(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from megatron_cegppo.evaluate import evaluate

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n"
                    + json.dumps({"prompt": "1+1=" * 10, "answer": "2"}) + "\n")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: CharTokenizer())
    generated = []

    class Engine:
        def __init__(self, *args, **kwargs):
            pass

        def generate(self, prompts, sampling, seeds):
            generated.extend(prompts)
            return [SimpleNamespace(prompt_index=i, text="\\boxed{2}") for i in range(len(prompts))]

    # a stand-in for the rollout package: vLLM is neither needed nor imported
    sampling = SimpleNamespace(from_rollout=lambda rollout, **changes: SimpleNamespace(**changes))
    rollout = SimpleNamespace(RolloutEngine=Engine, EngineConfig=SimpleNamespace, SamplingConfig=sampling)
    monkeypatch.setitem(sys.modules, "megatron_cegppo.rollout", rollout)
    cfg = Config()
    cfg.model.path, cfg.reward.name = str(tmp_path), "arithmetic"
    cfg.rollout.max_model_len, cfg.rollout.max_tokens = 24, 8  # 16 prompt tokens
    with pytest.raises(DataError, match="1 of 2 prompts are longer than 16 tokens"):
        evaluate(cfg, str(data), k=1)
    assert generated == []
    cfg.data.truncation = "left"
    result = evaluate(cfg, str(data), k=1)
    assert result["truncated_prompts"] == 1 and result["accuracy"] == 1.0
    assert [len(p) for p in generated] == [5, 16]
