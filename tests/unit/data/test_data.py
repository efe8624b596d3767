"""Prompt loading (.jsonl / .parquet, error messages), chat templating, and the
resumable shuffled sampler."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_cegppo.data import ShuffledSampler, apply_chat_template, load_prompts

# ---- load_prompts -----------------------------------------------------------------------


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_round_trip(tmp_path):
    rows = [{"prompt": "1+1=", "answer": 2, "extra": [1]}, {"prompt": "π?", "answer": "3.14"}]
    p = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    assert load_prompts(p) == [{"prompt": "1+1=", "answer": "2"}, {"prompt": "π?", "answer": "3.14"}]
    assert load_prompts(str(p)) == load_prompts(p)


def test_jsonl_custom_keys(tmp_path):
    p = _write(tmp_path / "d.jsonl", json.dumps({"question": "q", "solution": 0.5}) + "\n")
    assert load_prompts(p, prompt_key="question", answer_key="solution") == [{"prompt": "q", "answer": "0.5"}]


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": [1, 22], "id": [0, 1]}), p)
    assert load_prompts(p) == [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "22"}]


@pytest.mark.parametrize("text, pattern", [
    ('{"prompt": "a", "answer": 1}\n{"prompt": "b", "answer"\n', r"bad\.jsonl, line 2: invalid JSON"),
    ('{"prompt": "a", "answer": 1}\n\n{"prompt": "b", "x": 1}\n',
     r"bad\.jsonl, line 3: missing key 'answer' \(data\.answer_key; present keys: \['prompt', 'x'\]\)"),
    ('{"answer": 1}\n', r"bad\.jsonl, line 1: missing key 'prompt' \(data\.prompt_key; present keys: \['answer'\]\)"),
    ('[1, 2]\n', r"bad\.jsonl, line 1: expected a JSON object, got list"),
    ('{"prompt": "a", "answer": null}\n', r"bad\.jsonl, line 1: key 'answer' \(data\.answer_key\) is null"),
    ('{"prompt": 5, "answer": 1}\n', r"bad\.jsonl, line 1: 'prompt' must be a string or a list of chat messages, got int"),
    ("", r"bad\.jsonl: file is empty"),
    ("\n  \n", r"bad\.jsonl: file is empty"),
])
def test_jsonl_errors(tmp_path, text, pattern):
    p = _write(tmp_path / "bad.jsonl", text)
    with pytest.raises(ValueError, match=pattern):
        load_prompts(p)


def test_jsonl_bad_utf8(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"prompt": "a", "answer": 1}\n{"prompt": "\xff", "answer": 1}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid UTF-8"):
        load_prompts(p)


def test_unsupported_extension(tmp_path):
    p = _write(tmp_path / "d.csv", "prompt,answer\n")
    with pytest.raises(ValueError, match=r"d\.csv: unsupported file type '\.csv'.*\.jsonl.*\.parquet"):
        load_prompts(p)


def test_parquet_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "label": [1]}), p)
    with pytest.raises(ValueError, match=r"bad\.parquet, row 1: missing key 'answer' \(data\.answer_key; present keys: \['label', 'prompt'\]\)"):
        load_prompts(p)
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": [1, None]}), p)
    with pytest.raises(ValueError, match=r"bad\.parquet, row 2: key 'answer' \(data\.answer_key\) is null"):
        load_prompts(p)
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.int64())}), p)
    with pytest.raises(ValueError, match=r"bad\.parquet: file is empty"):
        load_prompts(p)


# ---- apply_chat_template ----------------------------------------------------------------

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")), unk_token="[UNK]"
    )
    assert not getattr(tok, "chat_template", None)
    return tok


def test_chat_template_applied(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", TEMPLATE, raising=False)
    assert apply_chat_template(tokenizer, "37+45=") == "<|user|>37+45=\n<|assistant|>"
    assert apply_chat_template(tokenizer, "37+45=", use_chat_template=True) == "<|user|>37+45=\n<|assistant|>"
    assert apply_chat_template(tokenizer, "37+45=", use_chat_template=False) == "37+45="


def test_no_chat_template_is_raw(tokenizer):
    assert apply_chat_template(tokenizer, "37+45=") == "37+45="
    assert apply_chat_template(object(), "x") == "x"
    with pytest.raises(ValueError, match="no chat_template"):
        apply_chat_template(tokenizer, "x", use_chat_template=True)


# ---- ShuffledSampler --------------------------------------------------------------------


def test_sampler_epochs_are_seeded_permutations():
    s = ShuffledSampler(10, seed=7)
    first, second = s.next_batch(10), s.next_batch(10)
    for epoch, order in enumerate((first, second)):
        ref = torch.randperm(10, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        assert order == ref
    assert sorted(first) == list(range(10)) and first != second
    assert ShuffledSampler(10, seed=7).next_batch(20) == first + second


def test_sampler_no_shuffle_and_crossing_boundaries():
    s = ShuffledSampler(3, seed=0, shuffle=False)
    assert s.next_batch(2) == [0, 1]
    assert s.next_batch(7) == [2, 0, 1, 2, 0, 1, 2]       # crosses two epoch boundaries
    assert s.next_batch(0) == []
    assert s.state_dict() == {"epoch": 3, "position": 0, "seed": 0, "num_items": 3, "consumed": 9, "shuffle": False}


def test_sampler_state_dict_fields():
    s = ShuffledSampler(5, seed=1)
    s.next_batch(7)
    sd = s.state_dict()
    assert (sd["epoch"], sd["position"], sd["consumed"], sd["seed"], sd["num_items"]) == (1, 2, 7, 1, 5)


@settings(max_examples=60, deadline=None)
@given(
    num_items=st.integers(1, 12),
    seed=st.integers(0, 2**31),
    sizes=st.lists(st.integers(0, 30), min_size=1, max_size=12),
    split=st.integers(0, 12),
)
def test_sampler_resume_is_exact(num_items, seed, sizes, split):
    split = min(split, len(sizes))
    a = ShuffledSampler(num_items, seed=seed)
    for n in sizes[:split]:
        a.next_batch(n)
    saved = json.loads(json.dumps(a.state_dict()))         # as it would go through a checkpoint
    rest = [a.next_batch(n) for n in sizes[split:]]
    b = ShuffledSampler(num_items, seed=seed)
    b.next_batch(3)                                        # its own position must not matter
    b.load_state_dict(saved)
    assert [b.next_batch(n) for n in sizes[split:]] == rest
    assert b.state_dict() == a.state_dict()


@pytest.mark.parametrize("change, pattern", [
    ({"num_items": 6}, "num_items=6 but this sampler has num_items=5"),
    ({"seed": 2}, "seed=2 but this sampler has seed=1"),
    ({"shuffle": False}, "shuffle=False"),
    ({"position": 5, "consumed": 5}, "out of range"),
    ({"consumed": 100}, "inconsistent"),
])
def test_sampler_load_validation(change, pattern):
    s = ShuffledSampler(5, seed=1)
    s.next_batch(3)
    sd = {**s.state_dict(), **change}
    with pytest.raises(ValueError, match=pattern):
        ShuffledSampler(5, seed=1).load_state_dict(sd)


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="num_items"):
        ShuffledSampler(0, seed=0)
    with pytest.raises(ValueError, match="batch size"):
        ShuffledSampler(3, seed=0).next_batch(-1)
    with pytest.raises(ValueError, match="missing"):
        ShuffledSampler(3, seed=0).load_state_dict({"seed": 0})


# ---- DataError ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ['{"prompt": "a"\n', '{"answer": 1}\n', ""])
def test_load_errors_are_data_errors(tmp_path, text):
    from megatron_cegppo.data.prompts import DataError

    with pytest.raises(DataError) as info:
        load_prompts(_write(tmp_path / "bad.jsonl", text))
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
