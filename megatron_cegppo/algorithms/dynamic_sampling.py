"""DAPO dynamic sampling: groups whose rewards are all equal carry no group-relative
signal, so they are dropped and generation repeats until a batch is full."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from megatron_cegppo.config.schema import AlgorithmConfig

from .advantages import group_all_equal, reshape_groups


def dynamic_sampling_filter(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool [G]: True for groups to keep (rewards not all equal)."""
    return ~group_all_equal(rewards, group_size)


@dataclass
class DynamicSamplingResult:
    records: List[Any]      # kept group records, at most target_groups
    rewards: torch.Tensor   # [len(records), group_size]
    rounds: int             # generate() calls made
    generated_groups: int   # groups generated over all rounds
    kept_groups: int        # groups that passed the filter (before truncation)
    target_groups: int

    @property
    def complete(self) -> bool:
        """False when max_rounds ran out first; the caller decides (log, train short)."""
        return len(self.records) == self.target_groups

    @property
    def shortfall(self) -> int:
        return self.target_groups - len(self.records)


Generate = Callable[[int], Tuple[Sequence[Any], Any]]  # num_groups -> (records, rewards)


class DynamicSampler:
    """Calls ``generate(groups_per_round)`` until ``target_groups`` groups with
    non-identical rewards are collected or ``max_rounds`` calls were made.
    ``generate`` returns one record per group and rewards [G*group_size] or [G, group_size]."""

    def __init__(
        self, generate: Generate, *, target_groups: int, group_size: int,
        max_rounds: int = AlgorithmConfig().max_sampling_rounds, groups_per_round: Optional[int] = None,
    ) -> None:
        for name, v in (("target_groups", target_groups), ("group_size", group_size), ("max_rounds", max_rounds)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.generate, self.target_groups, self.group_size = generate, target_groups, group_size
        self.max_rounds = max_rounds
        # Default: a full batch per round, the shape the rollout engine is sized for.
        self.groups_per_round = target_groups if groups_per_round is None else groups_per_round
        if not isinstance(self.groups_per_round, int) or self.groups_per_round < 1:
            raise ValueError(f"groups_per_round must be a positive int, got {groups_per_round!r}")

    def sample(self) -> DynamicSamplingResult:
        records: List[Any] = []
        kept_rewards: List[torch.Tensor] = []
        rounds = generated = kept = 0
        while kept < self.target_groups and rounds < self.max_rounds:
            group_records, rewards = self.generate(self.groups_per_round)
            rounds += 1
            group_records = list(group_records)
            r = reshape_groups(rewards, self.group_size)
            if r.shape[0] != len(group_records):
                raise ValueError(f"generate returned {len(group_records)} records but {r.shape[0]} reward groups")
            generated += r.shape[0]
            mask = dynamic_sampling_filter(r, self.group_size)
            kept += int(mask.sum())
            records.extend(rec for rec, keep in zip(group_records, mask.tolist()) if keep)
            kept_rewards.append(r[mask])
        n = min(kept, self.target_groups)
        rewards_out = torch.cat(kept_rewards)[:n] if kept_rewards else torch.empty(0, self.group_size)
        return DynamicSamplingResult(
            records=records[:n], rewards=rewards_out, rounds=rounds, generated_groups=generated,
            kept_groups=kept, target_groups=self.target_groups,
        )
