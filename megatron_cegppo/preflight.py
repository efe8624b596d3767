"""Checks of the files a config names (prompts, model folder, run directory) and of its reward
name, before torch starts: each problem one line, naming the config key.

Imports nothing heavy (no torch, transformers, megatron or vLLM): safetensors headers and
tokenizer.json are read as JSON, a sentencepiece model with ``sentencepiece``, a parquet file
with ``pyarrow``, only when the config names one."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional

from megatron_cegppo.config.schema import Config, DataConfig
from megatron_cegppo.data.prompts import SUPPORTED_EXTENSIONS as PROMPT_SUFFIXES
from megatron_cegppo.data.prompts import DataError, read_rows, row_problems, row_unit
from megatron_cegppo.models.hf_config import SUPPORTED_MODEL_TYPES as MODEL_TYPES

PROMPT_ROWS_CHECKED = 16
# a safetensors header is JSON of a few KB per tensor; more than this is not a header
MAX_HEADER_BYTES = 100 << 20
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
                "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def file_problems(cfg: Config) -> list[str]:
    """Every problem of the files ``cfg`` names (empty: none found)."""
    validation = [problem for i, path in enumerate(cfg.validation.datasets)
                  for problem in prompt_file_problems(cfg.data, path, f"validation.datasets[{i}]")]
    return (prompt_file_problems(cfg.data) + validation
            + model_folder_problems(cfg.model.path, weights=not cfg.model.megatron_checkpoint)
            + megatron_checkpoint_problems(cfg.model.megatron_checkpoint) + run_dir_problems(cfg.trainer.run_dir) + reward_problems(cfg.reward.name) + wandb_problems(cfg))


# ---- prompts --------------------------------------------------------------------------------


def prompt_file_problems(data: DataConfig, path: Optional[str] = None, setting: str = "data.train_path") -> list[str]:
    """The prompt file ``path`` (default ``data.train_path``; ``setting`` names it in the
    messages) exists, has a supported suffix, and its first rows parse and hold
    ``data.prompt_key`` (a string or messages) and ``data.answer_key``."""
    path = data.train_path if path is None else path
    if not path:
        return []  # validate() names a missing data.train_path
    p = Path(path)
    if not p.exists():
        return [f"{setting}: {path} does not exist"]
    if not p.is_file():
        return [f"{setting}: {path} is a folder, not a file"]
    suffix = p.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        return [f"{setting}: {path} has suffix {suffix or '(none)'!r}; supported: {', '.join(PROMPT_SUFFIXES)}"]
    return _row_problems(path, data, setting)


def _row_problems(path: str, data: DataConfig, setting: str) -> list[str]:
    """The first problem of each kind among the first rows: a wrong key name is one line, not
    one per row; a row that does not parse ends the check."""
    out: list[str] = []
    seen: set[str] = set()
    unit, count = row_unit(path), 0
    try:
        for n, row in read_rows(path, limit=PROMPT_ROWS_CHECKED):
            count += 1
            for kind, message in row_problems(row, data.prompt_key, data.answer_key):
                if kind not in seen:
                    seen.add(kind)
                    out.append(f"{setting}: {path}, {unit} {n}: {message}")
    except DataError as e:
        out.append(f"{setting}: {e}")
        return out
    if count == 0:
        out.append(f"{setting}: {path} is empty (no records)")
    return out


# ---- model folder ---------------------------------------------------------------------------


def model_folder_problems(path: str, weights: bool = True) -> list[str]:
    """The HF folder holds a config.json, safetensors weights whose shapes are the config's
    (unless ``weights`` is false: the weights come from elsewhere, and any there are checked),
    and a tokenizer whose ids fit the config's vocabulary."""
    if not path:
        return []  # validate() names a missing model.path
    folder = Path(path)
    if not folder.exists():
        return [f"model.path: {path} does not exist (an HF folder: config.json, *.safetensors, tokenizer)"]
    if not folder.is_dir():
        return [f"model.path: {path} is not a folder"]
    out: list[str] = []
    config = _read_model_config(folder, out)
    before = len(out)
    tensors = _read_weight_shapes(folder, out) if weights or _has_weights(folder) else {}
    complete = len(out) == before  # a missing or unreadable file: its tensors are not "lacking"
    vocab = _tokenizer_largest_id(folder, out)
    fields = _shape_fields(folder, config, out) if config is not None else None
    if fields is not None and tensors:
        out += _weight_shape_problems(folder, fields, tensors, complete)
    if fields is not None and vocab is not None:
        largest, source = vocab
        if largest >= fields["vocab_size"]:
            out.append(f"model.path: the tokenizer ({source}) has token ids up to {largest}, beyond config.json's "
                       f"vocab_size={fields['vocab_size']} (ids 0..{fields['vocab_size'] - 1})")
    return out


def _has_weights(folder: Path) -> bool:
    return (folder / "model.safetensors.index.json").exists() or any(folder.glob("*.safetensors"))


def megatron_checkpoint_problems(path: str) -> list[str]:
    """A Megatron-LM save folder (or one iteration's folder) of the torch_dist format; its
    tensors' shapes are checked when they are read (they need torch)."""
    if not path:
        return []
    from megatron_cegppo.checkpoint.megatron_lm import MegatronCheckpointError, resolve_iteration_dir

    try:
        resolve_iteration_dir(path)
    except MegatronCheckpointError as e:
        return [str(e)]
    return []


def _read_json(path: Path, out: list[str]) -> Optional[Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        out.append(f"model.path: {path} is not valid JSON ({e})")
    except OSError as e:
        out.append(f"model.path: {path} cannot be read ({e.strerror})")
    return None


def _read_model_config(folder: Path, out: list[str]) -> Optional[dict]:
    path = folder / "config.json"
    if not path.is_file():
        out.append(f"model.path: {folder} has no config.json")
        return None
    config = _read_json(path, out)
    if config is not None and not isinstance(config, dict):
        out.append(f"model.path: {path} is not a JSON object")
        return None
    return config


def _shape_fields(folder: Path, config: dict, out: list[str]) -> Optional[dict]:
    """The config's shape fields as the project reads them (models.hf_config.HFArchitecture),
    or None with the problems added."""
    path = folder / "config.json"
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        out.append(f"model.path: {path} has model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
        return None
    fields: dict = {}
    bad = []
    for key in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            bad.append(f"{key}={value!r}" if key in config else f"no {key}")
        fields[key] = value
    if bad:
        out.append(f"model.path: {path} needs positive integers: {', '.join(bad)}")
        return None
    heads = fields["num_attention_heads"]
    fields["num_key_value_heads"] = config.get("num_key_value_heads") or heads
    fields["head_dim"] = config.get("head_dim") or fields["hidden_size"] // heads
    fields["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    fields["qkv_bias"] = model_type == "qwen2" or bool(config.get("attention_bias", False))
    return fields


def _read_weight_shapes(folder: Path, out: list[str]) -> dict[str, tuple[list, Path]]:
    """``{tensor name: (shape, file)}`` from the safetensors headers, as the loader finds the
    files: the index's weight map when there is one, else every ``*.safetensors``."""
    index = folder / "model.safetensors.index.json"
    weight_map: Optional[dict] = None
    missing: list[str] = []
    if index.is_file():
        data = _read_json(index, out)
        if data is None:
            return {}
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            out.append(f"model.path: {index} has no weight_map")
            return {}
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            out.append(f"model.path: {index} names {len(missing)} file(s) that do not exist: {', '.join(missing)}")
        files = [f for f in files if f not in missing]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            other = " (pytorch_model.bin is not read: save with safe_serialization)" if any(
                folder.glob("pytorch_model*.bin")) else ""
            out.append(f"model.path: {folder} has no *.safetensors weights{other}")
            return {}
    tensors: dict[str, tuple[list, Path]] = {}
    for name in files:
        header = _safetensors_header(folder / name, out)
        for tensor, shape in (header or {}).items():
            tensors.setdefault(tensor, (shape, folder / name))
    if weight_map is not None:
        out += _index_mismatches(index, weight_map, tensors, missing)
    return tensors


def _index_mismatches(index: Path, weight_map: dict, tensors: dict, missing: list) -> list[str]:
    """Tensors the index maps to a file that does not hold them (one line for all)."""
    wrong = [t for t, f in weight_map.items() if f not in missing and (t not in tensors or tensors[t][1].name != f)]
    if not wrong:
        return []
    shown = ", ".join(f"{t} ({weight_map[t]})" for t in wrong[:3])
    return [f"model.path: {index} maps {len(wrong)} tensor(s) to files that do not hold them: {shown}"
            + (", ..." if len(wrong) > 3 else "")]


def _safetensors_header(path: Path, out: list[str]) -> Optional[dict[str, list]]:
    """``{tensor name: shape}`` of one safetensors file: an 8-byte little-endian length, then
    that much JSON; a file shorter than its header says (a cut download) is a problem."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            length = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if length < 0 or length > min(size - 8, MAX_HEADER_BYTES):
                out.append(f"model.path: {path} is not a safetensors file (no valid header)")
                return None
            header = json.loads(f.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError):
        out.append(f"model.path: {path} is not a safetensors file (its header is not JSON)")
        return None
    except OSError as e:
        out.append(f"model.path: {path} cannot be read ({e.strerror})")
        return None
    if not isinstance(header, dict):
        out.append(f"model.path: {path} is not a safetensors file (its header is not a JSON object)")
        return None
    data_bytes = size - 8 - length
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, (start, end) = [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            out.append(f"model.path: {path}: the header entry of {name} has no shape or data_offsets")
            return None
        if end > data_bytes:
            out.append(f"model.path: {path} is truncated: {name} ends at byte {end} of {data_bytes} "
                       "(an incomplete copy or download?)")
            return None
        shapes[name] = shape
    return shapes


def _expected_shapes(f: dict) -> Iterator[tuple[str, list, str]]:
    """``(HF tensor, shape, the config fields that give it)`` for the tensors checked: the
    embedding, layer 0's attention, MLP and norms, the final norm, lm_head unless tied."""
    h, v, ffn, d = f["hidden_size"], f["vocab_size"], f["intermediate_size"], f["head_dim"]
    heads, kv = f["num_attention_heads"], f["num_key_value_heads"]
    q_text = f"num_attention_heads={heads} x head_dim={d}"
    kv_text = f"num_key_value_heads={kv} x head_dim={d}"
    embed_text = f"vocab_size={v}, hidden_size={h}"
    yield "model.embed_tokens.weight", [v, h], embed_text
    layer = "model.layers.0."
    yield layer + "self_attn.q_proj.weight", [heads * d, h], f"{q_text}, hidden_size={h}"
    for name in ("k_proj", "v_proj"):
        yield layer + f"self_attn.{name}.weight", [kv * d, h], f"{kv_text}, hidden_size={h}"
    if f["qkv_bias"]:
        yield layer + "self_attn.q_proj.bias", [heads * d], q_text
        for name in ("k_proj", "v_proj"):
            yield layer + f"self_attn.{name}.bias", [kv * d], kv_text
    yield layer + "self_attn.o_proj.weight", [h, heads * d], f"hidden_size={h}, {q_text}"
    for name in ("gate_proj", "up_proj"):
        yield layer + f"mlp.{name}.weight", [ffn, h], f"intermediate_size={ffn}, hidden_size={h}"
    yield layer + "mlp.down_proj.weight", [h, ffn], f"hidden_size={h}, intermediate_size={ffn}"
    for name in (layer + "input_layernorm.weight", layer + "post_attention_layernorm.weight", "model.norm.weight"):
        yield name, [h], f"hidden_size={h}"
    if not f["tie_word_embeddings"]:
        yield "lm_head.weight", [v, h], f"{embed_text} (tie_word_embeddings=false)"


def _weight_shape_problems(folder: Path, fields: dict, tensors: dict, complete: bool) -> list[str]:
    out = []
    for name, shape, given_by in _expected_shapes(fields):
        if name not in tensors:
            if complete:
                out.append(f"model.path: the weights in {folder} lack {name}, which config.json's {given_by} needs")
            continue
        got, path = tensors[name]
        if got != shape:
            out.append(f"model.path: {path}: {name} has shape {got}; config.json's {given_by} give {shape}")
    layers = {int(m.group(1)) for m in map(_LAYER.match, tensors) if m}
    expected = fields["num_hidden_layers"]
    if complete and layers and max(layers) + 1 != expected:
        out.append(f"model.path: the weights in {folder} hold layers 0..{max(layers)} ({max(layers) + 1}); "
                   f"config.json's num_hidden_layers={expected}")
    return out


def _tokenizer_largest_id(folder: Path, out: list[str]) -> Optional[tuple[int, str]]:
    """``(largest token id, its source)`` of the tokenizer AutoTokenizer would load: tokenizer.json
    first, else a sentencepiece tokenizer.model, else vocab.json with merges.txt (BPE) or vocab.txt
    (WordPiece); added tokens of tokenizer_config.json and added_tokens.json count too."""
    base = _base_vocab_largest_id(folder, out)
    if base is None:
        return None
    largest, source = base
    added = _added_token_ids(folder, out)
    if added and max(added) > largest:
        return max(added), f"{source} with added tokens"
    return largest, source


def _base_vocab_largest_id(folder: Path, out: list[str]) -> Optional[tuple[int, str]]:
    if (folder / "tokenizer.json").is_file():
        return _tokenizer_json_largest_id(folder / "tokenizer.json", out)
    if (folder / "tokenizer.model").is_file():
        return _sentencepiece_largest_id(folder / "tokenizer.model", out)
    if (folder / "vocab.json").is_file():
        if not (folder / "merges.txt").is_file():
            out.append(f"model.path: {folder} has vocab.json but no merges.txt (a BPE tokenizer needs both)")
            return None
        vocab = _read_json(folder / "vocab.json", out)
        ids = [i for i in vocab.values() if isinstance(i, int)] if isinstance(vocab, dict) else []
        return (max(ids), "vocab.json") if ids else None
    if (folder / "vocab.txt").is_file():
        with open(folder / "vocab.txt", encoding="utf-8", errors="replace") as f:
            return sum(1 for _ in f) - 1, "vocab.txt"
    out.append(f"model.path: {folder} has no tokenizer (tokenizer.json, tokenizer.model, or vocab.json "
               "and merges.txt)")
    return None


def _tokenizer_json_largest_id(path: Path, out: list[str]) -> Optional[tuple[int, str]]:
    data = _read_json(path, out)
    if data is None:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        ids = [i for i in vocab.values() if isinstance(i, int)]
    elif isinstance(vocab, list):  # Unigram: [piece, score], the id is the position
        ids = [len(vocab) - 1] if vocab else []
    else:
        out.append(f"model.path: {path} has no model.vocab")
        return None
    ids += [t["id"] for t in data.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)]
    return (max(ids), "tokenizer.json") if ids else None


def _sentencepiece_largest_id(path: Path, out: list[str]) -> Optional[tuple[int, str]]:
    try:
        import sentencepiece as spm
    except ImportError:
        return None  # nothing to count with; the tokenizer is loaded later anyway
    try:
        return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size() - 1, "tokenizer.model"
    except (OSError, RuntimeError) as e:
        out.append(f"model.path: {path} is not a sentencepiece model ({str(e).splitlines()[0] if str(e) else e!r})")
        return None


def _added_token_ids(folder: Path, out: list[str]) -> list[int]:
    ids: list[int] = []
    config = folder / "tokenizer_config.json"
    if config.is_file():
        data = _read_json(config, out)
        decoder = data.get("added_tokens_decoder") if isinstance(data, dict) else None
        ids += [int(k) for k in (decoder or {}) if str(k).isdigit()]
    added = folder / "added_tokens.json"
    if added.is_file():
        data = _read_json(added, out)
        ids += [i for i in (data or {}).values() if isinstance(i, int)] if isinstance(data, dict) else []
    return ids


# ---- run directory, reward ------------------------------------------------------------------


def run_dir_problems(run_dir: str) -> list[str]:
    """The run directory is a writable folder, or can be made: its nearest existing parent is
    a writable folder. Nothing is created."""
    path = Path(os.path.abspath(run_dir or "."))
    try:
        if path.exists():
            if not path.is_dir():
                return [f"trainer.run_dir: {run_dir} is a file, not a folder"]
            if not os.access(path, os.W_OK | os.X_OK):
                return [f"trainer.run_dir: {run_dir} is not writable"]
            return []
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
    except OSError as e:  # e.g. a parent that cannot be searched
        return [f"trainer.run_dir: {run_dir} cannot be checked ({e.strerror})"]
    if not parent.is_dir():
        return [f"trainer.run_dir: {run_dir} cannot be created: {parent} is a file"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"trainer.run_dir: {run_dir} cannot be created: {parent} is not writable"]
    return []


def wandb_problems(cfg: Config) -> list[str]:
    """W&B asked for and installed (found without importing it: its import is slow)."""
    import importlib.util

    if cfg.wandb.enabled and importlib.util.find_spec("wandb") is None:
        return ["wandb.enabled: the wandb package is not installed (pip install megatron-cegppo[wandb])"]
    return []


def reward_problems(name: str) -> list[str]:
    """The reward is registered (the registry imports no torch; math-verify starts lazily)."""
    from megatron_cegppo.rewards.registry import get_reward

    try:
        get_reward(name)
    except ValueError as e:
        return [f"reward.name: {e}"]
    return []
