"""Rollout dumps: one JSON line per response with the step's numbers, texts cut to a bound, the
file to a size (whole lines, the last saying how many were left out)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from megatron_cegppo.rollout.engine import Completion
from megatron_cegppo.tracking.rollout_dump import MAX_TEXT_CHARS, dump_path, write_rollout_dump
from megatron_cegppo.trainer.rollout_dumps import rollout_dump_rows


class Tokenizer:
    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


def _rollout():
    completions = [Completion(7, [1, 2], [-0.1, -0.2], finish_reason="stop"),
                   Completion(7, [3], [-0.3], finish_reason="length"),
                   Completion(9, [4, 5, 6], [-0.4] * 3, finish_reason="stop"),
                   Completion(9, [7], [-0.5], finish_reason="stop")]
    return SimpleNamespace(completions=completions, prompts={7: [10, 11], 9: [12]},
                           rewards=torch.tensor([[1.0, -1.0], [-1.0, -1.0]]), advantages=torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_rows_of_the_first_groups():
    rows = rollout_dump_rows(_rollout(), {0: 0.01, 1: 0.02}, Tokenizer(), groups=1, group_size=2)
    assert rows == [
        {"group": 0, "prompt_index": 7, "prompt": "t10 t11", "response": "t1 t2", "reward": 1.0, "advantage": 0.5,
         "length": 2, "logprob_mismatch_mean": 0.01, "finish_reason": "stop"},
        {"group": 0, "prompt_index": 7, "prompt": "t10 t11", "response": "t3", "reward": -1.0,
         "advantage": -0.5, "length": 1, "logprob_mismatch_mean": 0.02, "finish_reason": "length"},
    ]
    assert len(rollout_dump_rows(_rollout(), {}, Tokenizer(), groups=5, group_size=2)) == 4  # no more than there are


def test_texts_and_files_are_bounded(tmp_path):
    long = {"group": 0, "prompt": "p", "response": "x" * (MAX_TEXT_CHARS + 10), "reward": 1.0}
    rows = [long] + [{"group": g, "prompt": "p", "response": "r" * 100, "reward": 0.0} for g in range(1, 100)]
    path = write_rollout_dump(tmp_path, 12, rows, max_bytes=MAX_TEXT_CHARS + 2000)
    assert path == dump_path(tmp_path, 12) == tmp_path / "rollouts" / "step_00000012.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines[0]["response"]) == MAX_TEXT_CHARS and lines[0]["truncated"] == ["response"]
    assert lines[-1]["left_out"] == 100 - (len(lines) - 1) and lines[-1]["left_out"] > 0
    assert path.stat().st_size <= MAX_TEXT_CHARS + 2000 + 100  # the closing line beside the bound
