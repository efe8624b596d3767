"""Prompt files as the CE-GPPO authors and verl save them, read unchanged: a ``prompt`` that is a
list of chat messages (maybe with a system turn), the answer at a nested key
(``reward_model.ground_truth``), .parquet and JSON lines under a .json suffix."""

from __future__ import annotations

import json

import pytest

from megatron_cegppo.config import load_config
from megatron_cegppo.data.prompts import DataError, apply_chat_template, load_prompts, tokenize_prompts
from megatron_cegppo.preflight import prompt_file_problems

CONVERSATION = [{"role": "system", "content": "Think step by step."},
                {"role": "user", "content": "What is 2+3? Put the answer in \\boxed{}."}]
ROWS = [
    {"data_source": "aime24", "prompt": CONVERSATION, "ability": "math",
     "reward_model": {"style": "rule", "ground_truth": "5"}, "extra_info": {"index": 0}},
    {"data_source": "aime24", "prompt": [{"role": "user", "content": "1+1?"}],
     "reward_model": {"style": "rule", "ground_truth": "2"}, "extra_info": {"index": 1}},
]
EXPECTED = [{"prompt": CONVERSATION, "answer": "5"}, {"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
KEYS = dict(prompt_key="prompt", answer_key="reward_model.ground_truth")


def test_json_lines_with_a_json_suffix(tmp_path):
    path = tmp_path / "aime-2024.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert load_prompts(path, **KEYS) == EXPECTED


def test_a_json_array(tmp_path):
    path = tmp_path / "aime.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert load_prompts(path, **KEYS) == EXPECTED


def test_parquet_with_nested_fields(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "dapo-math-17k.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_prompts(path, **KEYS) == EXPECTED


def test_a_literal_dotted_key_wins_over_the_nested_one(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "x", "a.b": "literal", "a": {"b": "nested"}}) + "\n")
    assert load_prompts(path, answer_key="a.b") == [{"prompt": "x", "answer": "literal"}]


@pytest.mark.parametrize("row, message", [
    ({"prompt": CONVERSATION, "reward_model": {"style": "rule"}},
     "line 1: missing key 'reward_model.ground_truth' (data.answer_key"),
    ({"prompt": [], "reward_model": {"ground_truth": "1"}}, "line 1: 'prompt' is an empty list of messages"),
    ({"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}},
     "line 1: 'prompt' message 1 must be an object with string 'role' and 'content'"),
])
def test_errors_name_the_file_and_line(tmp_path, row, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        load_prompts(path, **KEYS)
    assert str(err.value).startswith(f"{path}, {message.replace('line 1', 'line 2')}"), str(err.value)


def test_the_preflight_reads_the_same_layout(tmp_path):
    path = tmp_path / "train.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    data = load_config(None, [f"data.train_path={path}", "data.answer_key=reward_model.ground_truth"]).data
    assert prompt_file_problems(data) == []
    data.answer_key = "reward_model.answer"
    (problem,) = prompt_file_problems(data)
    assert "line 1: missing key 'reward_model.answer' (data.answer_key" in problem


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<|system|>", "<|user|>", "<|assistant|>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_a_conversation_is_rendered_whole_by_the_chat_template(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", TEMPLATE, raising=False)
    text = apply_chat_template(tokenizer, CONVERSATION)
    assert text == ("<|system|>Think step by step.\n<|user|>What is 2+3? Put the answer in \\boxed{}.\n"
                    "<|assistant|>")
    assert text == tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    cfg = load_config(None, [])
    (ids,), _, _ = tokenize_prompts(tokenizer, [{"prompt": CONVERSATION, "answer": "5"}], cfg, source="t")
    assert ids == tokenizer.encode(text, add_special_tokens=False)


def test_a_conversation_without_a_chat_template_is_refused(tokenizer):
    with pytest.raises(DataError, match="lists of chat messages, which need a chat template, but the tokenizer"):
        apply_chat_template(tokenizer, CONVERSATION)
    with pytest.raises(DataError, match="data.use_chat_template=false"):
        apply_chat_template(tokenizer, CONVERSATION, use_chat_template=False)
