"""Random rollout micro-batches in the layout the pipeline loss reads (label-aligned tokens,
positions, a response mask, per-token advantages), for the demos, benchmarks and tests that
need rollouts without generating them."""

from __future__ import annotations

from typing import Optional, Union

import torch


def random_rollout(generator: torch.Generator, *, rows: int, seq: int, vocab: int,
                   start: Union[int, tuple[int, int]], min_response: int = 1,
                   max_end: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [rows, seq + 1] and a float response mask [rows, seq], 1 on one span per row.

    A span starts at ``start`` (an int, or a ``(low, high)`` range drawn from per row) and
    ends (exclusive) at a position drawn from ``[start + min_response, max_end]`` (default
    ``seq``). The draws come from ``generator`` in a fixed order (the ids, then each row's
    start and end), so a seed gives the same batch on every rank."""
    ids = torch.randint(0, vocab, (rows, seq + 1), generator=generator)
    mask = torch.zeros(rows, seq)
    last = seq if max_end is None else max_end
    for row in range(rows):
        first = start if isinstance(start, int) else int(torch.randint(*start, (1,), generator=generator))
        end = int(torch.randint(first + min_response, last + 1, (1,), generator=generator))
        mask[row, first:end] = 1
    return ids, mask


def rollout_microbatch(ids: torch.Tensor, loss_mask: torch.Tensor, advantages: torch.Tensor,
                       **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """The micro-batch of token ids [rows, seq + 1]: inputs and next-token labels, positions,
    ``loss_mask`` [rows, seq], ``advantages`` per sequence [rows] (given to each of its
    tokens) or per token [rows, seq], and ``extra`` [rows, seq] tensors (``old_log_prob``,
    ...). Every tensor contiguous, where the inputs are."""
    rows, seq = loss_mask.shape
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(rows, seq)
    batch = dict(input_ids=ids[:, :-1], labels=ids[:, 1:], position_ids=torch.arange(seq).expand(rows, seq),
                 loss_mask=loss_mask, advantages=advantages, **extra)
    return {key: value.contiguous() for key, value in batch.items()}
