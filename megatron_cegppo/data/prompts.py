"""Prompt datasets on disk (.jsonl, .parquet) as ``{"prompt", "answer"}`` records, the
chat-template step that turns a prompt into the text the policy sees, and the limit on a
prompt's length in tokens."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from megatron_cegppo.config.schema import TRUNCATION_MODES, Config

SUPPORTED_EXTENSIONS = (".jsonl", ".parquet")


class DataError(ValueError):
    """A prompt file, or a prompt in it, the run cannot use; the message is one line."""


def _jsonl_rows(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    with open(path, "rb") as f:  # decoded per line so a bad byte is reported with its line
        for lineno, raw in enumerate(f, start=1):
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


def _parquet_rows(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
    for rowno, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield rowno, row


def load_prompts(path: str, *, prompt_key: str = "prompt", answer_key: str = "answer") -> List[Dict[str, str]]:
    """Records ``{"prompt": str, "answer": str}`` from a .jsonl file (one JSON object a
    line) or a .parquet file; errors name the file and the line (jsonl) or row (parquet)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {ext or '(none)'!r}; expected one of {SUPPORTED_EXTENSIONS}")
    rows = _jsonl_rows(path) if ext == ".jsonl" else _parquet_rows(path)
    unit = "line" if ext == ".jsonl" else "row"
    records = []
    for n, row in rows:
        for key in (prompt_key, answer_key):
            if key not in row:
                raise DataError(f"{path}, {unit} {n}: missing key {key!r} (present keys: {sorted(row)})")
            if row[key] is None:
                raise DataError(f"{path}, {unit} {n}: key {key!r} is null")
        prompt = row[prompt_key]
        if not isinstance(prompt, str):
            raise DataError(f"{path}, {unit} {n}: {prompt_key!r} must be a string, got {type(prompt).__name__}")
        records.append({"prompt": prompt, "answer": str(row[answer_key])})
    if not records:
        raise DataError(f"{path}: file is empty (no records)")
    return records


def apply_chat_template(tokenizer: Any, prompt: str, use_chat_template: Optional[bool] = None) -> str:
    """``prompt`` as one user turn plus the generation prompt when the tokenizer has a chat
    template, else unchanged. ``use_chat_template``: None = use it if present, False =
    always raw, True = require one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is True and not has_template:
        raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
    if use_chat_template is False or not has_template:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def prompt_token_limit(cfg: Config) -> int:
    """The most tokens a prompt may have: ``data.max_prompt_tokens``, else what the model leaves
    beside a full response, ``rollout.max_model_len - rollout.max_tokens``."""
    if cfg.data.max_prompt_tokens is not None:
        return cfg.data.max_prompt_tokens
    return cfg.rollout.max_model_len - cfg.rollout.max_tokens


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
