"""Prompt datasets on disk (.jsonl, .json, .parquet) as ``{"prompt", "answer"}`` records, the
chat-template step that turns a prompt into the text the policy sees, and the limit on a
prompt's length in tokens."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from megatron_cegppo.config.schema import TRUNCATION_MODES, Config, prompt_token_limit

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet")

# a prompt: a string, or a conversation (the authors' and verl's files) rendered whole by the
# tokenizer's chat template
Prompt = Union[str, List[Dict[str, str]]]


class DataError(ValueError):
    """A prompt file, or a prompt in it, the run cannot use; the message is one line."""


def row_unit(path: str) -> str:
    """What a file's records are counted in, in messages."""
    return "row" if os.path.splitext(path)[1].lower() == ".parquet" else "line"


def _json_lines(path: str, f) -> Iterator[Tuple[int, Dict[str, Any]]]:
    for lineno, raw in enumerate(f, start=1):  # decoded per line so a bad byte is reported with its line
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}, line {lineno}: not valid UTF-8 ({e.reason})") from None
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not records
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def _json_rows(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """JSON lines (.jsonl, and the .json files of the authors' validation sets), or a .json file
    holding one array of objects (numbered from 1 as lines would be)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if not (path.lower().endswith(".json") and head.startswith(b"[")):
            yield from _json_lines(path, f)
            return
        try:
            rows = json.loads(f.read().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}, record {n}: expected a JSON object, got {type(row).__name__}")
        yield n, row


def _parquet_rows(path: str, limit: Optional[int]) -> Iterator[Tuple[int, Dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading a parquet file needs pyarrow (pip install pyarrow)") from None
    try:
        if limit is None:
            rows = pq.read_table(path).to_pylist()
        else:  # the first rows only: the preflight of a large file stays cheap
            batch = next(pq.ParquetFile(path).iter_batches(batch_size=limit), None)
            rows = batch.to_pylist()[:limit] if batch is not None else []
    except Exception as e:  # pyarrow raises its own error types for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    yield from enumerate(rows, start=1)


def read_rows(path: str, limit: Optional[int] = None) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """``(line or row number, object)`` of a prompt file's records (the first ``limit``);
    a :class:`DataError` naming the file and the line or row where one does not parse."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {ext or '(none)'!r}; expected one of {SUPPORTED_EXTENSIONS}")
    rows = _parquet_rows(path, limit) if ext == ".parquet" else _json_rows(path)
    for count, item in enumerate(rows, start=1):
        yield item
        if limit is not None and count >= limit:
            return


_MISSING = object()


def lookup(row: Dict[str, Any], key: str) -> Any:
    """``row[key]``, or for a dotted key (``reward_model.ground_truth``) the nested value; a
    literal key with dots in it wins. ``_MISSING`` when absent."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _as_prompt(value: Any, key: str) -> Tuple[Optional[Prompt], Optional[str]]:
    """The prompt, or why ``value`` is not one."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, (list, tuple)):
        if not value:
            return None, f"{key!r} is an empty list of messages"
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return None, (f"{key!r} message {i + 1} must be an object with string 'role' and 'content', "
                              f"got {m!r:.80}")
        return [{"role": m["role"], "content": m["content"]} for m in value], None
    return None, f"{key!r} must be a string or a list of chat messages, got {type(value).__name__}"


def row_problems(row: Dict[str, Any], prompt_key: str, answer_key: str) -> List[Tuple[str, str]]:
    """``(kind, message)`` of each problem of one record: a missing or null key, a prompt that
    is neither a string nor a list of messages."""
    out = []
    for key, setting in ((prompt_key, "data.prompt_key"), (answer_key, "data.answer_key")):
        value = lookup(row, key)
        if value is _MISSING:
            out.append((setting, f"missing key {key!r} ({setting}; present keys: {sorted(row)})"))
        elif value is None:
            out.append((setting, f"key {key!r} ({setting}) is null"))
    prompt = lookup(row, prompt_key)
    if prompt is not _MISSING and prompt is not None:
        why = _as_prompt(prompt, prompt_key)[1]
        if why:
            out.append(("type", why))
    return out


def load_prompts(path: str, *, prompt_key: str = "prompt", answer_key: str = "answer") -> List[Dict[str, Any]]:
    """Records ``{"prompt": str or messages, "answer": str}`` from JSON lines (.jsonl, .json),
    a .json array or a .parquet file, read as the authors and verl save them: dotted keys
    reach nested fields, a prompt may be a list of ``{role, content}`` messages. Errors name
    the file and the line or row."""
    path = os.fspath(path)
    unit = row_unit(path)
    records = []
    for n, row in read_rows(path):
        problems = row_problems(row, prompt_key, answer_key)
        if problems:
            raise DataError(f"{path}, {unit} {n}: {problems[0][1]}")
        records.append({"prompt": _as_prompt(lookup(row, prompt_key), prompt_key)[0],
                        "answer": str(lookup(row, answer_key))})
    if not records:
        raise DataError(f"{path}: file is empty (no records)")
    return records


def apply_chat_template(tokenizer: Any, prompt: Prompt, use_chat_template: Optional[bool] = None) -> str:
    """The text the policy sees. A string: as one user turn plus the generation prompt when the
    tokenizer has a chat template, else unchanged. A list of messages: the whole conversation
    through the chat template, which it needs. ``use_chat_template``: None = use it if
    present, False = always raw (strings only), True = require one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, list):
        if use_chat_template is False or not has_template:
            why = "data.use_chat_template=false" if use_chat_template is False else "the tokenizer has no chat_template"
            raise DataError(f"the prompts are lists of chat messages, which need a chat template, but {why}")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if use_chat_template is True and not has_template:
        raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
    if use_chat_template is False or not has_template:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


class FittedPrompts(NamedTuple):
    token_ids: List[List[int]]
    truncated: int  # how many prompts were cut to the limit
    message: str  # one line saying so; "" when none was


def fit_prompt_lengths(token_id_lists: Sequence[Sequence[int]], *, max_prompt_tokens: int, truncation: str,
                       source: str = "the prompts") -> FittedPrompts:
    """Every prompt within ``max_prompt_tokens``. ``truncation``: error (a :class:`DataError`
    naming how many are too long and the longest), left (keep the last tokens: the end of a
    prompt, where a chat template asks for the answer), right (keep the first tokens)."""
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"data.truncation must be one of {list(TRUNCATION_MODES)}, got {truncation!r}")
    if max_prompt_tokens < 1:
        raise ValueError(f"the prompt token limit must be >= 1, got {max_prompt_tokens} (data.max_prompt_tokens, "
                         "or rollout.max_model_len - rollout.max_tokens)")
    too_long = [i for i, ids in enumerate(token_id_lists) if len(ids) > max_prompt_tokens]
    if too_long and truncation == "error":
        longest = max(too_long, key=lambda i: len(token_id_lists[i]))
        raise DataError(
            f"{source}: {len(too_long)} of {len(token_id_lists)} prompts are longer than {max_prompt_tokens} tokens "
            f"(data.max_prompt_tokens, default rollout.max_model_len - rollout.max_tokens); the longest is record "
            f"{longest + 1} with {len(token_id_lists[longest])} tokens. Set data.truncation=left or right to cut "
            "them, or raise rollout.max_model_len, lower rollout.max_tokens or set data.max_prompt_tokens")
    fitted = []
    for ids in token_id_lists:
        ids = list(ids)
        if len(ids) > max_prompt_tokens:
            ids = ids[-max_prompt_tokens:] if truncation == "left" else ids[:max_prompt_tokens]
        fitted.append(ids)
    message = ""
    if too_long:
        kept = "last" if truncation == "left" else "first"
        message = (f"{source}: {len(too_long)} of {len(token_id_lists)} prompts truncated to their {kept} "
                   f"{max_prompt_tokens} tokens (data.truncation={truncation})")
    return FittedPrompts(fitted, len(too_long), message)


def tokenize_prompts(tokenizer: Any, records: Sequence[Dict[str, str]], cfg: Config, *,
                     source: str) -> FittedPrompts:
    """The token ids of each record's prompt as the policy sees it (chat template applied when
    configured; the tokenizer's special tokens only on a raw prompt, a template has its own),
    within :func:`prompt_token_limit` as ``data.truncation`` says."""
    encoded = []
    for rec in records:
        text = apply_chat_template(tokenizer, rec["prompt"], cfg.data.use_chat_template)
        encoded.append(tokenizer.encode(text, add_special_tokens=text == rec["prompt"]))
    return fit_prompt_lengths(encoded, max_prompt_tokens=prompt_token_limit(cfg), truncation=cfg.data.truncation,
                              source=source)


def load_training_prompts(cfg: Config, tokenizer: Any) -> Tuple[List[Dict[str, Any]], str]:
    """``data.train_path``'s records, each with its ``token_ids`` fitted to the model (refused
    or cut as ``data.truncation`` says, here rather than at the first generation that samples
    it), and the line saying what was cut ("" when nothing was)."""
    records = load_prompts(cfg.data.train_path, prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key)
    fitted = tokenize_prompts(tokenizer, records, cfg, source=cfg.data.train_path)
    for rec, ids in zip(records, fitted.token_ids):
        rec["token_ids"] = ids
    return records, fitted.message
