"""Token batches from completions, the log-prob mismatch and truncated importance weights."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_cegppo.losses import cegppo_loss
from megatron_cegppo.rollout.batch import build_token_batch
from megatron_cegppo.rollout.engine import Completion, SamplingConfig
from megatron_cegppo.rollout.mismatch import logprob_mismatch, truncated_importance_weights


def test_batch_rows_are_label_aligned():
    prompts = {7: [1, 2, 3], 9: [4]}
    completions = [Completion(7, [10, 11], [-0.5, -1.5]), Completion(9, [12, 13, 14], [-0.1, -0.2, -0.3])]
    b = build_token_batch(prompts, completions, pad_id=0, seq_len=6)
    assert b["input_ids"][0].tolist() == [1, 2, 3, 10, 0, 0]
    assert b["labels"][0].tolist() == [2, 3, 10, 11, 0, 0]
    assert b["loss_mask"][0].tolist() == [0, 0, 1, 1, 0, 0]  # positions predicting 10 and 11
    assert b["rollout_log_prob"][0].tolist() == [0, 0, -0.5, -1.5, 0, 0]
    assert b["input_ids"][1].tolist() == [4, 12, 13, 0, 0, 0]
    assert b["loss_mask"][1].tolist() == [1, 1, 1, 0, 0, 0]
    assert torch.equal(b["labels"][1][:3], torch.tensor([12, 13, 14]))


def test_batch_too_long_is_named():
    with pytest.raises(ValueError, match="exceeds seq_len"):
        build_token_batch({0: [1, 2]}, [Completion(0, [3, 4, 5], [0.0] * 3)], pad_id=0, seq_len=3)


def test_mismatch_statistics():
    rollout = torch.tensor([[-1.0, -2.0, -3.0]])
    train = torch.tensor([[-1.0, -2.5, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    m = logprob_mismatch(rollout, train, mask)
    assert m["mismatch/abs_mean"] == pytest.approx(0.25)
    assert m["mismatch/abs_max"] == pytest.approx(0.5)
    assert m["mismatch/kl"] == pytest.approx((math.exp(-0.5) + 0.5 - 1) / 2)
    assert logprob_mismatch(rollout, train, torch.zeros(1, 3))["mismatch/abs_max"] == 0.0


def test_truncated_importance_weights_and_their_use_through_advantages():
    train = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    rollout = torch.tensor([[-1.0, -2.0, -0.5]])
    w = truncated_importance_weights(train, rollout, cap=2.0)
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, math.exp(-0.5)]]))
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(train, rollout, cap=0)
    # The losses are positively homogeneous in the advantage per token: scaling the
    # advantages by w scales each token's loss and gradient by w.
    old, adv, mask = torch.tensor([[-1.1, -0.7, -1.0]]), torch.tensor([[1.0, -2.0, 0.5]]), torch.ones(1, 3)
    kw = dict(loss_agg_mode="seq-mean-token-sum")
    g_weighted = torch.autograd.grad(cegppo_loss(train, old, adv * w, mask, **kw)[0], train)[0]
    per_token = [torch.autograd.grad(cegppo_loss(train, old, adv * (torch.arange(3) == t), mask, **kw)[0], train)[0][0, t]
                 for t in range(3)]
    torch.testing.assert_close(g_weighted[0], torch.stack(per_token) * w[0])


@pytest.mark.parametrize("kwargs,match", [(dict(n=0), "rollout.n must be >= 1"), (dict(temperature=0), "temperature"),
                                          (dict(top_p=1.5), "top_p")])
def test_sampling_config_is_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)
