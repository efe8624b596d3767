"""Pieces of the pipeline loss that need no processes: the spec's checks, the mini-batch
normalizer, and the reduction of per-micro-batch metrics."""

from __future__ import annotations

import pytest
import torch

from megatron_cegppo.losses import aggregate_loss
from megatron_cegppo.parallel.pipeline_loss import (
    PolicyLossSpec,
    minibatch_loss_normalizer,
    reduce_microbatch_metrics,
)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(loss="reinforce"), "unknown policy loss"), (dict(loss_agg_mode="mean"), "loss_agg_mode"),
     (dict(logprob_impl="triton"), "logprob_impl")],
)
def test_spec_rejects_unknown_names(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossSpec(**kwargs)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
def test_microbatch_losses_with_minibatch_normalizer_sum_to_the_minibatch_loss(mode):
    g = torch.Generator().manual_seed(3)
    loss_mat = torch.randn(6, 9, generator=g)
    mask = torch.rand(6, 9, generator=g) > 0.4
    mask[2] = False
    parts = [slice(0, 2), slice(2, 3), slice(3, 6)]
    norm = minibatch_loss_normalizer([mask[p] for p in parts], mode)
    total = sum(aggregate_loss(loss_mat[p], mask[p], mode, normalizer=norm) for p in parts)
    torch.testing.assert_close(total, aggregate_loss(loss_mat, mask, mode))


def test_metric_reduction_weights_by_tokens_and_sums_counts():
    stores = [dict(loss=torch.tensor(0.5), num_tokens=torch.tensor(10.0), clipfrac=torch.tensor(0.1),
                   **{"quadrant/pa_lp_clipped": torch.tensor(2.0)}, ratio_max=torch.tensor(1.3)),
              dict(loss=torch.tensor(0.25), num_tokens=torch.tensor(30.0), clipfrac=torch.tensor(0.5),
                   **{"quadrant/pa_lp_clipped": torch.tensor(5.0)}, ratio_max=torch.tensor(1.1))]
    out = reduce_microbatch_metrics(stores)
    assert out["loss"] == pytest.approx(0.75)
    assert out["num_tokens"] == 40
    assert out["clipfrac"] == pytest.approx((0.1 * 10 + 0.5 * 30) / 40)
    assert out["quadrant/pa_lp_clipped"] == 7
    assert out["ratio_max"] == pytest.approx(1.3)
