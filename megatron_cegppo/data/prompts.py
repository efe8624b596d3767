"""Prompt datasets on disk (.jsonl, .parquet) as ``{"prompt", "answer"}`` records, and the
chat-template step that turns a prompt into the text the policy sees."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

SUPPORTED_EXTENSIONS = (".jsonl", ".parquet")


def _jsonl_rows(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    with open(path, "rb") as f:  # decoded per line so a bad byte is reported with its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
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
        raise ValueError(f"{path}: unsupported file type {ext or '(none)'!r}; expected one of {SUPPORTED_EXTENSIONS}")
    rows = _jsonl_rows(path) if ext == ".jsonl" else _parquet_rows(path)
    unit = "line" if ext == ".jsonl" else "row"
    records = []
    for n, row in rows:
        for key in (prompt_key, answer_key):
            if key not in row:
                raise ValueError(f"{path}, {unit} {n}: missing key {key!r} (present keys: {sorted(row)})")
            if row[key] is None:
                raise ValueError(f"{path}, {unit} {n}: key {key!r} is null")
        prompt = row[prompt_key]
        if not isinstance(prompt, str):
            raise ValueError(f"{path}, {unit} {n}: {prompt_key!r} must be a string, got {type(prompt).__name__}")
        records.append({"prompt": prompt, "answer": str(row[answer_key])})
    if not records:
        raise ValueError(f"{path}: file is empty (no records)")
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
