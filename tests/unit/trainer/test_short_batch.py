"""A shrunk step (short_batch=shrink) is packed into fewer mini-batches of the full step's size,
not into as many smaller ones: an optimizer step always sees prompts_per_step / minibatches
groups, as in the authors' trainer."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from megatron_cegppo.config.schema import AlgorithmConfig
from megatron_cegppo.rollout.engine import Completion
from megatron_cegppo.trainer.step_phases import compute_advantages, groups_per_minibatch, pack_minibatches

N = 2
LAYOUT = SimpleNamespace(tp=1, pp=1, dp=1, dp_rank=0, platform=SimpleNamespace(place=lambda b: b, packed_attention="mask"))


def _rollout(groups: int):
    made = [SimpleNamespace(prompt_index=g, prompt_ids=[1, 2], rewards=[1.0, 0.0],
                            completions=[Completion(g, [3, 4], [-0.1, -0.2]) for _ in range(N)])
            for g in range(groups)]
    return compute_advantages(made, group_size=N, algorithm=AlgorithmConfig(), layout=LAYOUT, correct_score=1.0)


def test_minibatches_keep_their_size():
    a = AlgorithmConfig(prompts_per_step=8, minibatches=4, micro_batch_size=2)
    assert groups_per_minibatch(a) == 2
    for groups, count in ((8, 4), (6, 3), (2, 1)):
        minibatches = pack_minibatches(_rollout(groups), algorithm=a, layout=LAYOUT, pad_id=0, virtual_pipeline=False)
        assert len(minibatches) == count
        assert all(sum(m.input_ids.shape[0] for m in micro) == 2 * N for micro in minibatches)


def test_packed_minibatches_keep_their_size_too():
    a = AlgorithmConfig(prompts_per_step=8, minibatches=4, max_tokens_per_microbatch=16)
    minibatches = pack_minibatches(_rollout(4), algorithm=a, layout=LAYOUT, pad_id=0, virtual_pipeline=False)
    assert len(minibatches) == 2
    assert [sum(int(m.positive.numel()) for m in micro) for micro in minibatches] == [2 * N, 2 * N]
    assert torch.cat([m.positive for micro in minibatches for m in micro]).tolist() == [True, False] * 4
