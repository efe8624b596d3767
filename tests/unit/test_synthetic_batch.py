"""Synthetic rollout micro-batches: label-aligned, one response span per row, seeded."""

from __future__ import annotations

import torch

from megatron_cegppo.testing.synthetic_batch import random_rollout, rollout_microbatch


def test_spans_stay_in_their_ranges_and_repeat_with_the_seed():
    ids, mask = random_rollout(torch.Generator().manual_seed(1), rows=64, seq=12, vocab=5, start=(2, 6),
                               min_response=3, max_end=10)
    assert ids.shape == (64, 13) and ids.max() < 5 and mask.shape == (64, 12)
    for row in mask:
        on = row.nonzero().flatten().tolist()
        assert on == list(range(on[0], on[-1] + 1))  # one span
        assert 2 <= on[0] < 6 and len(on) >= 3 and on[-1] < 10
    again = random_rollout(torch.Generator().manual_seed(1), rows=64, seq=12, vocab=5, start=(2, 6),
                           min_response=3, max_end=10)
    assert torch.equal(ids, again[0]) and torch.equal(mask, again[1])


def test_a_fixed_start_draws_no_number():
    g = torch.Generator().manual_seed(0)
    _, mask = random_rollout(g, rows=3, seq=8, vocab=5, start=4, min_response=0)
    assert (mask[:, :4] == 0).all()
    reference = torch.Generator().manual_seed(0)
    torch.randint(0, 5, (3, 9), generator=reference)
    for _ in range(3):
        torch.randint(4, 9, (1,), generator=reference)
    assert torch.equal(torch.rand(1, generator=g), torch.rand(1, generator=reference))


def test_microbatch_is_label_aligned_with_per_token_advantages():
    ids = torch.arange(10).reshape(2, 5)
    mask = torch.tensor([[0.0, 1, 1, 0], [0, 0, 1, 1]])
    batch = rollout_microbatch(ids, mask, torch.tensor([1.0, -1.0]), old_log_prob=torch.zeros(2, 4))
    assert list(batch) == ["input_ids", "labels", "position_ids", "loss_mask", "advantages", "old_log_prob"]
    assert torch.equal(batch["input_ids"], ids[:, :-1]) and torch.equal(batch["labels"], ids[:, 1:])
    assert torch.equal(batch["position_ids"], torch.arange(4).expand(2, 4))
    assert torch.equal(batch["advantages"], torch.tensor([[1.0] * 4, [-1.0] * 4]))
    assert all(t.is_contiguous() for t in batch.values())
