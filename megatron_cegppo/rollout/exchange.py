"""Sharing sampled groups between ranks as flat tensors.

Each rollout leader's groups (a prompt index, its completions and their rewards) are packed
into one int32 buffer; the ranks exchange the buffers' sizes (one all-gather of one int64 per
rank) and then each non-empty buffer is broadcast from the rank that packed it, at its exact
size (no padding, and nothing is sent for the ranks that share another rank's engine). Every
rank unpacks every buffer, its own included, so all ranks hold the same values.

Buffer layout (int32)::

    header  int64 viewed as int32 pairs:
            [n_groups, n_completions, n_table,
             prompt_index * n_groups, count * n_groups,
             length * n_completions, finish_code * n_completions,
             reward (float64 bits) * n_completions,
             finish-reason table (utf-8 bytes, each reason ended by a newline) * n_table]
    tokens  int32 * sum(length)
    logprob float32 bits * sum(length)

Finish reasons are codes into the buffer's own table (0: None), so any string vLLM reports
comes back unchanged. Texts do not travel: rewards are computed where the text was generated.
Log-probs travel as float32 (what vLLM computes them in).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_cegppo.rollout.engine import Completion

_HEAD = 3  # n_groups, n_completions, n_table


@dataclass
class SampledGroup:
    """What is shared of one prompt's group: its index, completions and rewards."""

    prompt_index: int
    completions: list[Completion]
    rewards: list[float]


def pack_groups(groups: Sequence[SampledGroup]) -> torch.Tensor:
    """The groups as one flat int32 CPU tensor (layout in the module docstring)."""
    completions = [c for g in groups for c in g.completions]
    for g in groups:
        if len(g.rewards) != len(g.completions):
            raise ValueError(f"prompt {g.prompt_index}: {len(g.completions)} completions but {len(g.rewards)} rewards")
        for c in g.completions:
            if len(c.logprobs) != len(c.token_ids):
                raise ValueError(f"prompt {g.prompt_index}: {len(c.token_ids)} tokens but {len(c.logprobs)} log-probs")
    reasons = sorted({c.finish_reason for c in completions if c.finish_reason is not None})
    code = {r: i + 1 for i, r in enumerate(reasons)}
    if any("\n" in r for r in reasons):
        raise ValueError(f"finish reasons with a newline cannot be shared: {reasons}")
    table = list("".join(r + "\n" for r in reasons).encode("utf-8"))
    lengths = [len(c.token_ids) for c in completions]
    total = sum(lengths)
    header = np.array(
        [len(groups), len(completions), len(table)]
        + [g.prompt_index for g in groups]
        + [len(g.completions) for g in groups]
        + lengths
        + [code.get(c.finish_reason, 0) for c in completions],
        dtype=np.int64)
    rewards = np.array([float(r) for g in groups for r in g.rewards], dtype=np.float64)
    try:
        tokens = np.fromiter(chain.from_iterable(c.token_ids for c in completions), dtype=np.int32, count=total)
    except OverflowError as e:
        raise ValueError(f"a token id does not fit in int32: {e}") from None
    logprobs = np.fromiter(chain.from_iterable(c.logprobs for c in completions), dtype=np.float32, count=total)
    buffer = np.concatenate([header.view(np.int32), rewards.view(np.int32),
                             np.array(table, dtype=np.int64).view(np.int32), tokens, logprobs.view(np.int32)])
    return torch.from_numpy(buffer)


def unpack_groups(buffer: torch.Tensor) -> list[SampledGroup]:
    """The groups :func:`pack_groups` packed into ``buffer`` (any device)."""
    buffer = buffer.detach().to("cpu", torch.int32).contiguous().numpy()
    if buffer.size == 0:
        return []
    n_groups, n_completions, n_table = buffer[: 2 * _HEAD].view(np.int64).tolist()
    n_header = _HEAD + 2 * n_groups + 3 * n_completions + n_table
    header = buffer[: 2 * n_header].view(np.int64)
    at = _HEAD
    prompt_index = header[at: at + n_groups].tolist(); at += n_groups
    counts = header[at: at + n_groups].tolist(); at += n_groups
    lengths = header[at: at + n_completions].tolist(); at += n_completions
    codes = header[at: at + n_completions].tolist(); at += n_completions
    rewards = header[at: at + n_completions].view(np.float64).tolist(); at += n_completions
    table = bytes(header[at: at + n_table].tolist()).decode("utf-8")
    reasons: list[Optional[str]] = [None] + table.split("\n")[:-1]
    total = sum(lengths)
    start = 2 * n_header
    if buffer.size != start + 2 * total:
        raise ValueError(f"buffer of {buffer.size} int32 but the header describes {start + 2 * total}")
    tokens = buffer[start: start + total]
    logprobs = buffer[start + total:].view(np.float32)
    groups, c, offset = [], 0, 0
    for index, count in zip(prompt_index, counts):
        cs = []
        for _ in range(count):
            end = offset + lengths[c]
            cs.append(Completion(index, tokens[offset:end].tolist(), logprobs[offset:end].tolist(), "",
                                 reasons[codes[c]]))
            offset, c = end, c + 1
        groups.append(SampledGroup(index, cs, rewards[c - count: c]))
    return groups


def exchange_buffers(packed: torch.Tensor, *, device: torch.device, group=None) -> list[Optional[torch.Tensor]]:
    """Every rank's 1-D int32 ``packed`` on every rank of ``group``, in rank order (None for an
    empty one): one all-gather of the sizes, then one broadcast per non-empty buffer at its
    own size. Collective. The returned entry of this rank is ``packed`` itself; the others are
    on ``device``."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    size = torch.tensor([packed.numel()], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = torch.cat(sizes).tolist()
    buffers: list[Optional[torch.Tensor]] = [None] * world
    works = []
    for src in range(world):
        if sizes[src] == 0:
            continue
        if src == rank:
            buffers[src] = packed.to(device)
        else:
            buffers[src] = torch.empty(sizes[src], dtype=torch.int32, device=device)
        global_src = src if group is None else dist.get_global_rank(group, src)
        works.append(dist.broadcast(buffers[src], global_src, group=group, async_op=True))
    for work in works:
        work.wait()
    if sizes[rank]:
        buffers[rank] = packed
    return buffers


def share_groups(groups: Sequence[SampledGroup], *, send: bool, device: torch.device,
                 group=None) -> list[SampledGroup]:
    """Every rank's groups (those of ranks with ``send``), in rank order, on every rank of
    ``group``. Collective: every rank calls it. Tensors passed to the collectives live on
    ``device`` (the one the process group's backend takes)."""
    packed = pack_groups(groups) if send else torch.empty(0, dtype=torch.int32)
    result: list[SampledGroup] = []
    for buffer in exchange_buffers(packed, device=device, group=group):
        if buffer is not None:
            result.extend(unpack_groups(buffer))
    return result
