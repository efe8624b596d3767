"""The correct-response flags of the positive-sample NLL term travel with their sequences into
packed and unpacked micro-batches, and a step's flags are its rewards equal to the reward's
correct score."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_cegppo.config.schema import AlgorithmConfig
from megatron_cegppo.rollout.batch import build_microbatches
from megatron_cegppo.rollout.engine import Completion
from megatron_cegppo.trainer.step_phases import compute_advantages

PROMPTS = {0: [1, 2, 3], 1: [4, 5]}
COMPLETIONS = [Completion(0, [6, 7], [-0.5, -0.6]), Completion(1, [8, 9, 10], [-0.1, -0.2, -0.3]),
               Completion(0, [11], [-0.7]), Completion(1, [12, 13], [-0.4, -0.5])]
POSITIVE = torch.tensor([True, False, False, True])


def _build(**kw):
    return build_microbatches(PROMPTS, COMPLETIONS, torch.ones(4), pad_id=0, seq_len=8, place=lambda b: b,
                              positive=POSITIVE, **kw)


def test_unpacked_rows_keep_their_flags():
    micro = _build(micro_batch_size=3)
    assert [m.positive.tolist() for m in micro] == [[True, False, False], [True]]


def test_packed_rows_keep_their_flags():
    micro = _build(packs=[[3, 0], [1, 2]], packed_tokens=16)
    assert [m.positive.tolist() for m in micro] == [[True, True], [False, False]]


def test_flag_count_must_match():
    with pytest.raises(ValueError, match="4 completions but 3 positive values"):
        build_microbatches(PROMPTS, COMPLETIONS, torch.ones(4), pad_id=0, seq_len=8, place=lambda b: b,
                           positive=POSITIVE[:3], micro_batch_size=2)


def test_a_step_marks_the_responses_whose_reward_is_the_correct_score():
    groups = [SimpleNamespace(prompt_index=0, prompt_ids=PROMPTS[0], completions=COMPLETIONS[0::2], rewards=[1.0, -1.0]),
              SimpleNamespace(prompt_index=1, prompt_ids=PROMPTS[1], completions=COMPLETIONS[1::2], rewards=[-1.0, 1.0])]
    layout = SimpleNamespace(tp=1)
    rollout = compute_advantages(groups, group_size=2, algorithm=AlgorithmConfig(), layout=layout, correct_score=1.0)
    assert rollout.positive.tolist() == [True, False, False, True]
    assert compute_advantages(groups, group_size=2, algorithm=AlgorithmConfig(), layout=layout,
                              correct_score=5.0).positive.tolist() == [False] * 4
