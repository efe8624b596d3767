"""The demo's task tokenizer and the warm-up that writes the RL starting checkpoint."""

import json
import os
import random

import pytest

pytest.importorskip("sentencepiece")
pytest.importorskip("transformers")

from megatron_cegppo.demo.tokenizer import BOXED, load_task_tokenizer, train_task_tokenizer  # noqa: E402

TEXT = "37+45=\\boxed{82}"
FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_task_tokenizer(str(d))
    return str(d)


def _qwen2_config(vocab_size):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=64, num_attention_heads=2,
                       num_key_value_heads=1, num_hidden_layers=1, intermediate_size=64)


def test_round_trip_and_vocab(tok_dir):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = load_task_tokenizer(tok_dir)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == TEXT
    assert ids.count(tok.convert_tokens_to_ids(BOXED)) == 1
    assert len(ids) == len("37+45=") + 1 + len("82}")  # no BOS, \boxed{ is one token
    assert tok.encode(BOXED, add_special_tokens=False) == [4]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)

    # The 3-token trap: whatever loads the folder must see the whole sentencepiece vocab.
    n = spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model")).get_piece_size()
    assert n == 18
    assert len(AutoTokenizer.from_pretrained(tok_dir)) == n == len(tok)


def test_same_encoding_next_to_a_qwen2_config(tok_dir, tmp_path):
    # transformers picks Qwen2Tokenizer for a qwen2 checkpoint folder; it must agree with
    # the tokenizer the model was trained with, \boxed{ included after skipping specials.
    import shutil

    from transformers import AutoTokenizer

    for name in FILES:
        shutil.copy(os.path.join(tok_dir, name), tmp_path / name)
    _qwen2_config(18).save_pretrained(tmp_path)
    plain = AutoTokenizer.from_pretrained(tok_dir)
    beside_model = load_task_tokenizer(str(tmp_path))
    assert beside_model.encode(TEXT) == plain.encode(TEXT)
    ids = beside_model.encode(TEXT) + [2, 3]
    assert beside_model.decode(ids, skip_special_tokens=True) == TEXT
    assert 4 not in beside_model.all_special_ids


def test_tokenizer_bytes_are_deterministic(tmp_path):
    texts = ["12+34=\\boxed{46}", "99+99=\\boxed{198}"]
    for d in ("a", "b"):
        train_task_tokenizer(str(tmp_path / d), texts=texts)
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_warmup_uses_the_task_format_and_reward():
    from megatron_cegppo.demo.warmup import _all_pairs
    from megatron_cegppo.rewards.synthetic import arithmetic_problem, arithmetic_reward

    assert arithmetic_problem(37, 45) == {"prompt": "37+45=", "answer": "82"}
    assert len(_all_pairs(2)) == 90 * 90
    assert arithmetic_reward("\\boxed{82}", "82") == 1.0
    assert arithmetic_reward("\\boxed{ 82 }\\boxed{1}", "82") == 1.0
    assert arithmetic_reward("\\boxed{1}\\boxed{82}", "82") == 0.0
    assert arithmetic_reward("82}", "82") == 0.0


def test_warmup_smoke_writes_loadable_checkpoint(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_cegppo.demo.warmup import main

    out = tmp_path / "ckpt"
    assert main(["--out", str(out), "--seed", "0", "--max-steps", "5", "--eval-every", "5",
                 "--eval-size", "64", "--batch-size", "32"]) == 0

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = model.config
    assert cfg.model_type == "qwen2" and cfg.vocab_size == len(tok) == 18
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 4, 2)
    assert cfg.head_dim == 32 and cfg.num_hidden_layers == 2 and not cfg.tie_word_embeddings
    assert os.path.exists(out / "model.safetensors")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tok.encode("37+45=")])).logits
    assert logits.shape == (1, 6, 18)

    rec = json.loads((out / "warmup.json").read_text())
    assert rec["steps_trained"] == 5 and rec["seed"] == 0
    assert [step for step, _ in rec["history"]] == [0, 5]  # evaluated before training and every 5 steps
    # the record keeps the evaluated weights closest to the target, and says so
    best_step, best_acc = min(rec["history"], key=lambda h: abs(h[1] - rec["target_accuracy"]))
    assert (rec["step"], rec["sampled_accuracy"]) == (best_step, best_acc)
    lo, hi = rec["target_accuracy"] - rec["band"], rec["target_accuracy"] + rec["band"]
    assert rec["reached_target"] == (lo <= best_acc <= hi)
    # and its accuracy is the saved model's: the held-out prompts sampled again from the files
    from megatron_cegppo.demo.warmup import _all_pairs, sampled_accuracy
    from megatron_cegppo.rewards.synthetic import arithmetic_problem

    pairs = _all_pairs(rec["digits"])
    random.Random(rec["seed"]).shuffle(pairs)
    held_out = [arithmetic_problem(a, b) for a, b in pairs[:rec["eval_prompts"]]]
    assert sampled_accuracy(model, tok, held_out, seed=rec["eval_sampling_seed"]) == pytest.approx(best_acc, abs=0.02)


@pytest.mark.parametrize("seed", range(5))
def test_written_addition_is_the_column_working(seed):
    from megatron_cegppo.rewards.synthetic import written_addition

    rng = random.Random(seed)
    for _ in range(200):
        a, b = rng.randint(0, 99999), rng.randint(0, 99999)
        steps = written_addition(a, b).split(",")
        assert steps[-1] == ""  # every column ends with a comma
        digits, carry = [], 0
        for i, step in enumerate(steps[:-1]):
            terms, total = step.split("=")
            column = [int(str(x)[::-1][i]) for x in (a, b) if i < len(str(x))]
            assert [int(t) for t in terms.split("+")] == column + ([1] if carry else [])
            assert int(total) == sum(column) + carry
            digits.append(int(total) % 10)
            carry = int(total) // 10
        # the columns' last digits, with the final carry in front, read the sum
        assert int(("1" if carry else "") + "".join(map(str, reversed(digits)))) == a + b
    assert written_addition(457, 368) == "7+8=15,5+6+1=12,4+3+1=8,"


def test_tokenizer_with_an_extra_character_keeps_every_character(tmp_path):
    tok_dir = str(tmp_path / "tok")
    train_task_tokenizer(tok_dir, texts=[","])
    tok = load_task_tokenizer(tok_dir)
    text = "457+368=7+8=15,5+6+1=12,4+3+1=8,\\boxed{825}"
    assert tok.decode(tok.encode(text)) == text
    assert tok.unk_token_id not in tok.encode(text)
    assert len(tok) == 19  # 4 specials, \boxed{, 13 task characters and ","


def test_written_steps_warmup_trains_the_working(tmp_path):
    from transformers import AutoTokenizer

    from megatron_cegppo.demo.warmup import _encode_examples, main
    from megatron_cegppo.rewards.synthetic import arithmetic_problem

    out = tmp_path / "ckpt"
    assert main(["--out", str(out), "--digits", "3", "--written-steps", "--max-steps", "2",
                 "--eval-every", "2", "--eval-size", "16", "--batch-size", "8"]) == 0
    rec = json.loads((out / "warmup.json").read_text())
    assert (rec["digits"], rec["written_steps"], rec["vocab_size"]) == (3, True, 19)
    tok = AutoTokenizer.from_pretrained(out)
    seqs, prompt_lens = _encode_examples(tok, [arithmetic_problem(457, 368)], written_steps=True)
    assert tok.decode(seqs[0][prompt_lens[0]:], skip_special_tokens=True) == "7+8=15,5+6+1=12,4+3+1=8,\\boxed{825}"
    assert seqs[0][-1] == tok.eos_token_id
