"""Splitting a rollout batch into optimizer minibatches and those into microbatches.
Equal sizes are required: pipeline schedules run a fixed number of same-shape
microbatches, and uneven minibatches would weight samples unequally across steps."""

from __future__ import annotations

from typing import List, Sequence, TypeVar

T = TypeVar("T")


def _split(items: Sequence[T], size: int) -> List[List[T]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def split_minibatches(num_items: int, num_minibatches: int) -> List[List[int]]:
    """``num_minibatches`` contiguous index lists of equal size covering ``range(num_items)``."""
    if not isinstance(num_minibatches, int) or num_minibatches < 1:
        raise ValueError(f"num_minibatches must be a positive int, got {num_minibatches!r}")
    if not isinstance(num_items, int) or num_items < 1 or num_items % num_minibatches:
        raise ValueError(
            f"cannot split {num_items} items into {num_minibatches} equal minibatches "
            f"(num_items must be a positive multiple of num_minibatches)"
        )
    return _split(range(num_items), num_items // num_minibatches)


def microbatches(indices: Sequence[T], micro_batch_size: int) -> List[List[T]]:
    """Contiguous chunks of ``micro_batch_size`` from ``indices`` (whose length it must divide)."""
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
    if len(indices) == 0 or len(indices) % micro_batch_size:
        raise ValueError(
            f"cannot split {len(indices)} items into microbatches of {micro_batch_size} "
            f"(the count must be a positive multiple of micro_batch_size)"
        )
    return _split(indices, micro_batch_size)
