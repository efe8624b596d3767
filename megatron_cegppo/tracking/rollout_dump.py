"""Rollout dumps: every ``trainer.rollout_dump_every`` steps, the first groups of the step as
JSON lines in ``<run_dir>/rollouts/step_NNNNNNNN.jsonl``: prompt, response, reward, advantage,
length and the response's mean |vLLM - Megatron| log-prob mismatch, each text cut to
``MAX_TEXT_CHARS`` and the file to ``max_bytes`` (whole lines), written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

from megatron_cegppo.fsutil import atomic_write_text

DUMP_DIR = "rollouts"
MAX_TEXT_CHARS = 20_000  # a 16k-token response is ~60k characters: its head is kept, and said


def _cut(text: str) -> tuple[str, bool]:
    return (text[:MAX_TEXT_CHARS], True) if len(text) > MAX_TEXT_CHARS else (text, False)


def dump_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / DUMP_DIR / f"step_{step:08d}.jsonl"


def write_rollout_dump(run_dir: str | Path, step: int, rows: Iterable[Mapping], *, max_bytes: int) -> Path:
    """``rows``: dicts with ``group``, ``prompt``, ``response`` (texts) and numbers. Lines past
    ``max_bytes`` are left out (the last line says how many)."""
    lines, size, left_out = [], 0, 0
    for row in rows:
        record = dict(row)
        truncated = []
        for key in ("prompt", "response"):
            record[key], cut = _cut(record[key])
            if cut:
                truncated.append(key)
        if truncated:
            record["truncated"] = truncated
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if size + len(line.encode()) > max_bytes:
            left_out += 1
            continue
        lines.append(line)
        size += len(line.encode())
    if left_out:
        lines.append(json.dumps({"left_out": left_out, "reason": f"over {max_bytes} bytes"}) + "\n")
    path = dump_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(lines))
    return path
