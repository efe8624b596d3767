"""Group-relative advantages (GRPO / Dr. GRPO) and the test for groups without signal."""

from __future__ import annotations

import torch


def reshape_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``rewards`` ([G*n] or [G, n]) as a float [G, n] tensor, validated."""
    rewards = torch.as_tensor(rewards)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.dim() == 2 and rewards.shape[1] != group_size:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)} but group_size={group_size}")
    if rewards.dim() not in (1, 2) or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be [num_groups*group_size] or [num_groups, group_size]; got shape "
            f"{tuple(rewards.shape)} with group_size={group_size}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    return rewards.reshape(-1, group_size)


def group_all_equal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool [G]: True where every reward in the group is the same (no learning signal)."""
    return _rows_all_equal(reshape_groups(rewards, group_size))


def _rows_all_equal(groups: torch.Tensor) -> torch.Tensor:
    return (groups == groups[:, :1]).all(dim=1)


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, *, eps: float = 1e-6, normalize_std: bool = True
) -> torch.Tensor:
    """[G*n] advantages ``(r - group mean) / (group std + eps)`` with the unbiased std, or
    only ``r - group mean`` when ``normalize_std=False`` (Dr. GRPO). Groups whose rewards
    are all equal get exactly 0 (the mean of equal floats can be off by an ulp, and a
    group of one has no std)."""
    r = reshape_groups(rewards, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps) if group_size > 1 else adv
    equal = _rows_all_equal(r)[:, None]
    return torch.where(equal, torch.zeros_like(adv), adv).reshape(-1)
