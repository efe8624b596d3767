"""The factors between this project's aggregation modes and verl's ``agg_loss`` (used by the
CE-GPPO authors) that the README states, on a concrete mini-batch. verl aggregates each
micro-batch on its own and averages the micro-batches (gradient accumulation with a fixed
micro-batch size); this project aggregates the mini-batch exactly, whatever its micro-batching."""

from __future__ import annotations

import pytest
import torch

from megatron_cegppo.losses import aggregate_loss

L = 6
LOSS = torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.0, 0.0],
                     [4.0, 5.0, 0.0, 0.0, 0.0, 0.0],
                     [6.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                     [7.0, 8.0, 9.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0, 0, 0],
                     [1, 1, 0, 0, 0, 0],
                     [0, 0, 0, 0, 0, 0],  # a response with no tokens (e.g. cut by the length limit)
                     [1, 1, 1, 1, 1, 1]], dtype=torch.bool)


def verl_agg_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """verl.trainer.ppo.core_algos.agg_loss, from its definition."""
    m = mask.to(loss.dtype)
    if mode == "token-mean":
        return (loss * m).sum() / (m.sum() + 1e-8)
    if mode == "seq-mean-token-sum":
        return (loss * m).sum(-1).mean()
    if mode == "seq-mean-token-mean":
        return ((loss * m).sum(-1) / m.sum(-1)).mean()
    return (loss * m).sum() / m.shape[-1]  # seq-mean-token-sum-norm


def verl_accumulated(mode: str, micro_batch_size: int) -> float:
    """Gradient accumulation as verl does it with a fixed micro-batch size: each micro-batch's
    agg_loss divided by the number of micro-batches, summed."""
    parts = [verl_agg_loss(LOSS[i:i + micro_batch_size], MASK[i:i + micro_batch_size], mode)
             for i in range(0, len(LOSS), micro_batch_size)]
    return float(sum(parts) / len(parts))


def here(mode: str) -> float:
    return float(aggregate_loss(LOSS, MASK, mode))


def test_token_mean_differs_unless_micro_batches_hold_as_many_tokens():
    assert here("token-mean") == pytest.approx(LOSS[MASK].mean().item())
    assert verl_accumulated("token-mean", 4) == pytest.approx(here("token-mean"))  # one micro-batch
    # micro-batches of 5 and 6 tokens: each is averaged alone, then the two means
    first, second = LOSS[:2][MASK[:2]].mean().item(), LOSS[2:][MASK[2:]].mean().item()
    assert verl_accumulated("token-mean", 2) == pytest.approx((first + second) / 2)
    assert verl_accumulated("token-mean", 2) != pytest.approx(here("token-mean"))


def test_seq_mean_token_sum_counts_non_empty_sequences_here_and_all_rows_in_verl():
    non_empty, rows = int(MASK.any(-1).sum()), len(MASK)
    assert verl_accumulated("seq-mean-token-sum", 4) == pytest.approx(here("seq-mean-token-sum") * non_empty / rows)


def test_seq_mean_token_mean_is_nan_in_verl_with_an_empty_response():
    assert torch.isnan(torch.tensor(verl_accumulated("seq-mean-token-mean", 4)))
    means = [LOSS[i][MASK[i]].mean().item() for i in range(len(LOSS)) if MASK[i].any()]
    assert here("seq-mean-token-mean") == pytest.approx(sum(means) / len(means))
    kept = MASK.any(-1)  # without it, the two agree for one micro-batch
    assert float(aggregate_loss(LOSS[kept], MASK[kept], "seq-mean-token-mean")) == pytest.approx(
        float(verl_agg_loss(LOSS[kept], MASK[kept], "seq-mean-token-mean")))


def test_sum_norm_is_micro_batch_size_times_larger_in_verl():
    assert here("seq-mean-token-sum-norm") == pytest.approx(float((LOSS * MASK).sum()) / (len(LOSS) * L))
    for b in (1, 2, 4):
        assert verl_accumulated("seq-mean-token-sum-norm", b) == pytest.approx(here("seq-mean-token-sum-norm") * b)
