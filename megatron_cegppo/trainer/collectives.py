"""The few collectives the trainer's own bookkeeping needs (flags, small objects), each one a
no-op in a world of one. Flags travel as device tensors: NCCL takes nothing else."""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist

from megatron_cegppo.platform import Layout


def _distributed(layout: Layout) -> bool:
    return dist.is_initialized() and layout.world > 1


def any_rank(layout: Layout, flag) -> bool:
    """Whether ``flag`` (a bool or a 0-dim tensor) holds on any rank: one all-reduced device
    tensor, also in a world of one (where it costs a host sync only)."""
    platform = layout.platform
    flag = flag.to(platform.device, torch.float32) if isinstance(flag, torch.Tensor) else platform.tensor(float(flag))
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def all_finite(layout: Layout, tensors: Iterable) -> bool:
    """Whether every tensor on every rank is finite: accumulated on the device, one
    all-reduced flag, one host sync."""
    bad = layout.platform.tensor(0.0)
    for t in tensors:
        if t is not None and t.numel():
            bad = torch.maximum(bad, (~torch.isfinite(t)).any().to(bad.dtype))
    return not any_rank(layout, bad)


def barrier(layout: Layout) -> None:
    if _distributed(layout):
        dist.barrier()


def gather_objects(layout: Layout, obj: Any) -> list:
    """Every rank's ``obj`` (small: names, digests, metric dicts), in rank order, on every rank."""
    if not _distributed(layout):
        return [obj]
    parts = [None] * layout.world
    dist.all_gather_object(parts, obj)
    return parts


def from_rank0(layout: Layout, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (what the others pass is ignored)."""
    if not _distributed(layout):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
