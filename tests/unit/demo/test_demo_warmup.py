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
