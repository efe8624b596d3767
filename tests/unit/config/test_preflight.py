"""Up-front checks of the files a config names: each bad prompt file, model folder (config,
weights, shapes, tokenizer), run directory and reward name refused as one line naming the
key, all problems at once, with no torch imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from megatron_cegppo.config import Config
from megatron_cegppo import preflight
from megatron_cegppo.preflight import file_problems, model_folder_problems, run_dir_problems

ROOT = Path(__file__).resolve().parents[3]
SHAPE = dict(model_type="qwen2", vocab_size=20, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
             head_dim=4, intermediate_size=24, num_hidden_layers=2, tie_word_embeddings=False,
             rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64)
TOKENS = 18  # ids 0..17, below vocab_size 20


def tensor_shapes(c: dict) -> dict[str, tuple]:
    """Every tensor of a Qwen2 HF checkpoint of config ``c``."""
    h, d, ffn = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, q), p + "mlp.gate_proj.weight": (ffn, h),
            p + "mlp.up_proj.weight": (ffn, h), p + "mlp.down_proj.weight": (h, ffn),
        })
    return shapes


def tokenizer_json(n: int, added: tuple = ()) -> dict:
    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, n)}}
    return {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
            "added_tokens": [{"id": 0, "content": "<unk>", "special": True}]
            + [{"id": i, "content": f"<x{i}>", "special": True} for i in added]}


def write_model(folder: Path, files: int = 1, **changes) -> Path:
    """A tiny HF folder (zero weights) whose config.json, weights and tokenizer agree."""
    c = {**SHAPE, **changes}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(c))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(TOKENS)))
    state = {n: np.zeros(s, np.float32) for n, s in tensor_shapes(c).items()}
    if files == 1:
        save_file(state, str(folder / "model.safetensors"))
        return folder
    names, weight_map = sorted(state), {}
    for i in range(files):
        fname = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        save_file({n: state[n] for n in names[i::files]}, str(folder / fname))
        weight_map.update({n: fname for n in names[i::files]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def edit_config(folder: Path, **changes) -> None:
    c = json.loads((folder / "config.json").read_text())
    c.update(changes)
    (folder / "config.json").write_text(json.dumps(c))


def write_prompts(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def model(tmp_path):
    return write_model(tmp_path / "model")


@pytest.fixture
def cfg(tmp_path, model):
    c = Config()
    c.model.path = str(model)
    c.data.train_path = str(write_prompts(tmp_path / "p.jsonl", [{"prompt": "1+1=", "answer": "2"}] * 3))
    c.trainer.run_dir = str(tmp_path / "runs" / "a")
    c.reward.name = "arithmetic"
    return c


def one_problem(found: list[str], *parts: str) -> str:
    assert len(found) == 1, found
    for part in parts:
        assert part in found[0], (part, found[0])
    assert "\n" not in found[0]
    return found[0]


def test_a_good_config_has_no_problems(cfg):
    assert file_problems(cfg) == []
    assert not Path(cfg.trainer.run_dir).exists()  # checked, not created


def test_sharded_weights_and_a_tied_model_are_good(tmp_path):
    assert model_folder_problems(str(write_model(tmp_path / "sharded", files=3))) == []
    assert model_folder_problems(str(write_model(tmp_path / "tied", tie_word_embeddings=True))) == []


def test_every_problem_at_once(cfg, tmp_path):
    cfg.data.train_path = str(tmp_path / "none.jsonl")
    (Path(cfg.model.path) / "config.json").unlink()
    cfg.trainer.run_dir = str(tmp_path / "p.jsonl" / "run")
    cfg.reward.name = "nope"
    found = file_problems(cfg)
    assert [p.split(":")[0] for p in found] == ["data.train_path", "model.path", "trainer.run_dir", "reward.name"]
    assert all("\n" not in p for p in found)


# ---- prompts --------------------------------------------------------------------------------


def test_prompt_file_missing_folder_or_suffix(cfg, tmp_path):
    cfg.data.train_path = str(tmp_path / "none.jsonl")
    one_problem(file_problems(cfg), "data.train_path:", "none.jsonl does not exist")
    cfg.data.train_path = str(tmp_path)
    one_problem(file_problems(cfg), "data.train_path:", "is a folder, not a file")
    (tmp_path / "p.csv").write_text("prompt,answer\n")
    cfg.data.train_path = str(tmp_path / "p.csv")
    one_problem(file_problems(cfg), "data.train_path:", "'.csv'", ".jsonl, .json, .parquet")


@pytest.mark.parametrize("rows, parts", [
    ([{"prompt": "a", "answer": 1}, '{"prompt": "b", "answer"'], ["p.jsonl, line 2: invalid JSON"]),
    ([{"prompt": "a", "answer": 1}, "[1]"], ["line 2: expected a JSON object, got list"]),
    ([{"prompt": "a", "answer": 1}, "", {"prompt": "b", "x": 1}],
     ["line 3: missing key 'answer'", "data.answer_key", "['prompt', 'x']"]),
    ([{"prompt": "a", "answer": None}], ["line 1: key 'answer' (data.answer_key) is null"]),
    ([{"prompt": 5, "answer": 1}], ["line 1: 'prompt' must be a string or a list of chat messages, got int"]),
    ([], ["p.jsonl is empty"]),
])
def test_prompt_rows(cfg, tmp_path, rows, parts):
    cfg.data.train_path = str(write_prompts(tmp_path / "p.jsonl", rows))
    one_problem(file_problems(cfg), "data.train_path:", *parts)


def test_a_wrong_key_name_is_one_line_per_key(cfg, tmp_path):
    cfg.data.train_path = str(write_prompts(tmp_path / "p.jsonl", [{"q": "a", "a": 1}] * 20))
    found = file_problems(cfg)
    assert len(found) == 2 and "data.prompt_key" in found[0] and "data.answer_key" in found[1]
    assert all("line 1: missing key" in p for p in found)


def test_only_the_first_rows_are_read(cfg, tmp_path):
    rows = [{"prompt": "a", "answer": 1}] * preflight.PROMPT_ROWS_CHECKED + ["not json"]
    cfg.data.train_path = str(write_prompts(tmp_path / "p.jsonl", rows))
    assert file_problems(cfg) == []


def test_bad_utf8(cfg, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_bytes(b'{"prompt": "\xff", "answer": 1}\n')
    cfg.data.train_path = str(p)
    one_problem(file_problems(cfg), "line 1: not valid UTF-8")


def test_parquet(cfg, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "p.parquet"
    cfg.data.train_path = str(p)
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": [1, 2]}), p)
    assert file_problems(cfg) == []
    pq.write_table(pa.table({"prompt": ["a"], "label": [1]}), p)
    one_problem(file_problems(cfg), "p.parquet, row 1: missing key 'answer'", "['label', 'prompt']")
    pq.write_table(pa.table({"prompt": ["a", None], "answer": [1, 2]}), p)
    one_problem(file_problems(cfg), "row 2: key 'prompt' (data.prompt_key) is null")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.int64())}), p)
    one_problem(file_problems(cfg), "p.parquet is empty")
    p.write_text("not parquet")
    one_problem(file_problems(cfg), "p.parquet: not a readable parquet file")


# ---- model folder ---------------------------------------------------------------------------


def test_model_path_missing_or_a_file(tmp_path):
    one_problem(model_folder_problems(str(tmp_path / "none")), "model.path:", "none does not exist")
    (tmp_path / "f").write_text("")
    one_problem(model_folder_problems(str(tmp_path / "f")), "model.path:", "is not a folder")


def test_config_json_missing_invalid_or_incomplete(model):
    (model / "config.json").unlink()
    one_problem(model_folder_problems(str(model)), f"model.path: {model} has no config.json")
    (model / "config.json").write_text("{not json")
    one_problem(model_folder_problems(str(model)), "config.json is not valid JSON")
    (model / "config.json").write_text(json.dumps({k: v for k, v in SHAPE.items() if k != "hidden_size"}))
    one_problem(model_folder_problems(str(model)), "config.json needs positive integers: no hidden_size")
    edit_config(model, hidden_size="16")
    one_problem(model_folder_problems(str(model)), "hidden_size='16'")
    edit_config(model, hidden_size=16, model_type="gpt2")
    one_problem(model_folder_problems(str(model)), "model_type 'gpt2'", "qwen2, llama")


def test_no_weights(model):
    (model / "model.safetensors").unlink()
    one_problem(model_folder_problems(str(model)), "has no *.safetensors weights")
    (model / "pytorch_model.bin").write_bytes(b"")
    one_problem(model_folder_problems(str(model)), "pytorch_model.bin is not read")


def test_index_names_a_missing_file(tmp_path):
    folder = write_model(tmp_path / "m", files=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    one_problem(model_folder_problems(str(folder)), "model.safetensors.index.json names 1 file(s) that do not exist",
                "model-00002-of-00003.safetensors")


def test_index_maps_a_tensor_to_the_wrong_file(tmp_path):
    folder = write_model(tmp_path / "m", files=2)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.norm.weight"] = next(f for f in set(data["weight_map"].values())
                                                   if f != data["weight_map"]["model.norm.weight"])
    index.write_text(json.dumps(data))
    one_problem(model_folder_problems(str(folder)), "maps 1 tensor(s) to files that do not hold them",
                "model.norm.weight")


def test_truncated_or_foreign_safetensors(model):
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    one_problem(model_folder_problems(str(model)), "model.safetensors is truncated")
    weights.write_bytes(b"\xff" * 64)
    one_problem(model_folder_problems(str(model)), "model.safetensors is not a safetensors file")
    length = (10).to_bytes(8, "little")
    weights.write_bytes(length + b"not json!!" + b"\0" * 8)
    one_problem(model_folder_problems(str(model)), "its header is not JSON")


@pytest.mark.parametrize("field, value, parts", [
    ("vocab_size", 40, ["model.embed_tokens.weight has shape [20, 16]", "vocab_size=40, hidden_size=16 give [40, 16]"]),
    ("num_attention_heads", 8, ["q_proj.weight has shape [16, 16]", "num_attention_heads=8 x head_dim=4"]),
    ("num_key_value_heads", 4, ["k_proj.weight has shape [8, 16]", "num_key_value_heads=4 x head_dim=4"]),
    ("head_dim", 8, ["q_proj.weight has shape [16, 16]", "head_dim=8"]),
    ("intermediate_size", 32, ["gate_proj.weight has shape [24, 16]", "intermediate_size=32"]),
    ("hidden_size", 32, ["model.embed_tokens.weight has shape [20, 16]", "hidden_size=32"]),
])
def test_config_shapes_disagree_with_the_weights(model, field, value, parts):
    edit_config(model, **{field: value})
    found = model_folder_problems(str(model))
    assert found and all(p.startswith("model.path: ") and "\n" not in p for p in found)
    assert any(all(part in p for part in parts) for p in found), found


def test_layer_count(model):
    edit_config(model, num_hidden_layers=3)
    one_problem(model_folder_problems(str(model)), "hold layers 0..1 (2)", "num_hidden_layers=3")


def test_lm_head_needed_unless_tied(tmp_path):
    folder = write_model(tmp_path / "m", tie_word_embeddings=True)
    edit_config(folder, tie_word_embeddings=False)
    one_problem(model_folder_problems(str(folder)), "lack lm_head.weight", "tie_word_embeddings=false")


def test_qkv_bias_expected_for_qwen2_only(tmp_path):
    folder = write_model(tmp_path / "m")
    weights = folder / "model.safetensors"
    from safetensors.numpy import load_file

    state = {k: v for k, v in load_file(str(weights)).items() if not k.endswith("_proj.bias")}
    save_file(state, str(weights))
    found = model_folder_problems(str(folder))
    assert len(found) == 3 and all("q_proj.bias" in p or "k_proj.bias" in p or "v_proj.bias" in p for p in found)
    edit_config(folder, model_type="llama")
    assert model_folder_problems(str(folder)) == []


def test_no_tokenizer(model):
    (model / "tokenizer.json").unlink()
    one_problem(model_folder_problems(str(model)), "has no tokenizer")
    (model / "vocab.json").write_text(json.dumps({"a": 0}))
    one_problem(model_folder_problems(str(model)), "has vocab.json but no merges.txt")
    (model / "merges.txt").write_text("#version: 0.2\n")
    assert model_folder_problems(str(model)) == []


def test_tokenizer_json_invalid(model):
    (model / "tokenizer.json").write_text("{")
    one_problem(model_folder_problems(str(model)), "tokenizer.json is not valid JSON")


def test_tokenizer_ids_beyond_the_vocabulary(model):
    (model / "tokenizer.json").write_text(json.dumps(tokenizer_json(TOKENS, added=(25,))))
    one_problem(model_folder_problems(str(model)), "tokenizer (tokenizer.json) has token ids up to 25",
                "vocab_size=20 (ids 0..19)")
    (model / "tokenizer.json").write_text(json.dumps(tokenizer_json(21)))
    one_problem(model_folder_problems(str(model)), "ids up to 20")


def test_added_tokens_of_tokenizer_config_count(model):
    (model / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"20": {"content": "<x>"}}}))
    one_problem(model_folder_problems(str(model)), "tokenizer.json with added tokens", "ids up to 20")


def test_unigram_tokenizer_json(model):
    data = {"model": {"type": "Unigram", "vocab": [[f"p{i}", -1.0] for i in range(21)]}, "added_tokens": []}
    (model / "tokenizer.json").write_text(json.dumps(data))
    one_problem(model_folder_problems(str(model)), "ids up to 20")


# the demo's tokenizer: sentencepiece tokenizer.model beside tokenizer.json


@pytest.fixture(scope="module")
def task_model(tmp_path_factory):
    """The project's tiny task model (demo tokenizer), as tests and the demo build it."""
    from megatron_cegppo.testing.tiny import save_tiny_task_model

    folder = tmp_path_factory.mktemp("task") / "model"
    save_tiny_task_model(folder)
    return folder


def test_the_tiny_task_model_is_good(task_model):
    assert model_folder_problems(str(task_model)) == []


def test_sentencepiece_model_alone(task_model, tmp_path):
    folder = write_model(tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes((task_model / "tokenizer.model").read_bytes())
    assert model_folder_problems(str(folder)) == []
    edit_config(folder, vocab_size=17)
    found = model_folder_problems(str(folder))
    assert any("tokenizer (tokenizer.model) has token ids up to 17" in p for p in found), found
    (folder / "tokenizer.model").write_bytes(b"not a model")
    edit_config(folder, vocab_size=20)
    one_problem(model_folder_problems(str(folder)), "tokenizer.model is not a sentencepiece model")


def test_no_torch_imported(task_model, tmp_path):
    """validate stays fast: the checks of a good config import no torch, transformers,
    megatron or vLLM."""
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    code = f"""
import sys
from megatron_cegppo.config import load_config
from megatron_cegppo.preflight import file_problems
cfg = load_config({str(ROOT / 'configs/tiny_cpu.yaml')!r}, [
    "model.path={task_model}", "data.train_path={prompts}", "trainer.run_dir={tmp_path / 'run'}"])
assert file_problems(cfg) == [], file_problems(cfg)
heavy = [m for m in ("torch", "transformers", "megatron", "vllm") if m in sys.modules]
assert not heavy, heavy
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


# ---- run directory, reward ------------------------------------------------------------------


def test_run_dir_good_cases(tmp_path):
    assert run_dir_problems(str(tmp_path)) == []
    assert run_dir_problems(str(tmp_path / "a" / "b" / "c")) == []
    assert not (tmp_path / "a").exists()


def test_run_dir_is_a_file_or_below_one(tmp_path):
    (tmp_path / "f").write_text("")
    one_problem(run_dir_problems(str(tmp_path / "f")), "trainer.run_dir:", "is a file, not a folder")
    one_problem(run_dir_problems(str(tmp_path / "f" / "run")), "cannot be created", f"{tmp_path / 'f'} is a file")


def test_run_dir_not_writable(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # os.access says yes to root whatever the mode bits: refuse this one folder instead
    monkeypatch.setattr(preflight.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    one_problem(run_dir_problems(str(locked)), "trainer.run_dir:", "is not writable")
    one_problem(run_dir_problems(str(locked / "a" / "b")), "cannot be created", f"{locked} is not writable")


def test_unknown_reward(cfg, monkeypatch):
    from megatron_cegppo.rewards import registry

    cfg.reward.name = "mathh"
    one_problem(file_problems(cfg), "reward.name: unknown reward 'mathh'", "arithmetic, math")
    monkeypatch.setitem(registry._REWARDS, "mathh", lambda response, answer: 0.0)  # registered by the user
    assert file_problems(cfg) == []


# ---- a Megatron-LM checkpoint ---------------------------------------------------------------


def write_megatron_lm_save(save: Path) -> Path:
    (save / "iter_0000007").mkdir(parents=True)
    (save / "iter_0000007" / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (save / "latest_checkpointed_iteration.txt").write_text("7")
    return save


def test_a_bad_megatron_checkpoint_is_named_with_the_rest(cfg, tmp_path):
    cfg.model.megatron_checkpoint = str(tmp_path / "nope")
    cfg.reward.name = "nope"
    found = file_problems(cfg)
    assert [p.split(":")[0] for p in found] == ["model.megatron_checkpoint", "reward.name"], found
    assert "does not exist" in found[0]


def test_with_a_megatron_checkpoint_the_hf_folder_needs_no_weights(cfg, tmp_path):
    (Path(cfg.model.path) / "model.safetensors").unlink()
    one_problem(file_problems(cfg), "has no *.safetensors weights")
    cfg.model.megatron_checkpoint = str(write_megatron_lm_save(tmp_path / "save"))
    assert file_problems(cfg) == []
    edit_config(Path(cfg.model.path), vocab_size=10)  # the tokenizer still has to fit
    one_problem(file_problems(cfg), "beyond config.json's vocab_size=10")
