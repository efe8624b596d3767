"""Token batches for Megatron from prompts and sampled completions."""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch

from megatron_cegppo.parallel.microbatch import MicroBatch
from megatron_cegppo.rollout.engine import Completion


def build_token_batch(
    prompts: Mapping[int, Sequence[int]], completions: Sequence[Completion], *, pad_id: int, seq_len: int
) -> dict[str, torch.Tensor]:
    """One row per completion: prompt + response, right-padded to ``seq_len``. Tensors are
    label-aligned (position t scores ``labels[t]``, the token after ``input_ids[t]``):
    ``input_ids``, ``position_ids``, ``labels``, ``loss_mask`` (1 on response tokens) and
    ``rollout_log_prob`` (the engine's log-prob of each response token)."""
    rows = len(completions)
    input_ids = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(rows, seq_len)
    rollout_lp = torch.zeros(rows, seq_len)
    for row, c in enumerate(completions):
        tokens = list(prompts[c.prompt_index]) + list(c.token_ids)
        if len(tokens) > seq_len + 1:
            raise ValueError(f"prompt + response of {len(tokens)} tokens exceeds seq_len + 1 = {seq_len + 1}")
        n = len(tokens) - 1
        t = torch.tensor(tokens)
        input_ids[row, :n] = t[:-1]
        labels[row, :n] = t[1:]
        start = len(prompts[c.prompt_index]) - 1  # the position that predicts the first response token
        loss_mask[row, start:n] = 1.0
        rollout_lp[row, start:n] = torch.tensor(c.logprobs, dtype=torch.float32)
    position_ids = torch.arange(seq_len).expand(rows, seq_len).contiguous()
    return dict(input_ids=input_ids, position_ids=position_ids, labels=labels, loss_mask=loss_mask,
                rollout_log_prob=rollout_lp)


ATTENTION_LAYOUTS = ("mask", "thd")


def build_microbatches(
    prompts: Mapping[int, Sequence[int]], completions: Sequence[Completion], advantages: torch.Tensor, *,
    pad_id: int, seq_len: int, place: Callable[[MicroBatch], MicroBatch], micro_batch_size: Optional[int] = None,
    packs: Optional[Sequence[Sequence[int]]] = None, packed_tokens: Optional[int] = None, attention: str = "mask",
    positive: Optional[torch.Tensor] = None, sequence_index: Optional[torch.Tensor] = None,
) -> list[MicroBatch]:
    """This rank's share of a mini-batch as micro-batches.

    Unpacked (``micro_batch_size``): rows of ``micro_batch_size`` completions, each right-padded
    to ``seq_len``. Packed (``packs``: lists of indices into ``completions``, e.g. from
    :func:`megatron_cegppo.algorithms.packing.pack_microbatches`): each list becomes one row of
    ``packed_tokens`` tokens, its sequences back to back, separated by a block-diagonal causal
    mask (``attention="mask"``) or THD ``packed_seq_params`` (``"thd"``). Either way the loss
    fields (``loss_mask``, ``advantages``, ``rollout_log_prob``) keep one row per completion of
    ``seq_len`` positions, so every loss and aggregation mode sees what it sees unpacked.

    Built and cut on the host; each micro-batch is handed to ``place`` (the platform's
    placement step), so every tensor the model, the loss and the collectives see lives where
    the model is. ``positive`` ([completions] bool): the responses judged correct, for the
    positive-sample NLL term; ``sequence_index`` ([completions] long): each one's place in the
    step (to report per-response values)."""
    if len(advantages) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(advantages)} advantages")
    per_sequence = {name: (values, dtype) for name, values, dtype in (
        ("positive", positive, torch.bool), ("sequence_index", sequence_index, torch.long)) if values is not None}
    for name, (values, _) in per_sequence.items():
        if len(values) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(values)} {name} values")
    if (micro_batch_size is None) == (packs is None):
        raise ValueError("give either micro_batch_size (unpacked) or packs (packed)")
    batch = build_token_batch(prompts, completions, pad_id=pad_id, seq_len=seq_len)
    batch["advantages"] = advantages.to(torch.float32).unsqueeze(1).expand(-1, seq_len).contiguous()
    for name, (values, dtype) in per_sequence.items():
        batch[name] = torch.as_tensor(values, dtype=dtype)
    if packs is None:
        return [place(MicroBatch(**{k: v[i:i + micro_batch_size] for k, v in batch.items()}))
                for i in range(0, len(completions), micro_batch_size)]
    if attention not in ATTENTION_LAYOUTS:
        raise ValueError(f"attention must be one of {list(ATTENTION_LAYOUTS)}, got {attention!r}")
    lengths = [len(prompts[c.prompt_index]) + len(c.token_ids) - 1 for c in completions]
    out = []
    for rows in packs:
        rows = list(rows)
        out.append(place(_pack_rows(batch, rows, [lengths[r] for r in rows], packed_tokens, pad_id, attention)))
    return out


def _pack_rows(batch: dict, rows: list[int], lengths: list[int], tokens: int, pad_id: int, attention: str) -> MicroBatch:
    """One packed row of the sequences ``rows`` of an unpacked token batch."""
    used = sum(lengths)
    if tokens is None or used > tokens:
        raise ValueError(f"sequences of {used} tokens do not fit a packed row of {tokens}")
    seq_len = batch["input_ids"].shape[1]
    input_ids = torch.full((1, tokens), pad_id, dtype=torch.long)
    labels = torch.full((1, tokens), pad_id, dtype=torch.long)
    position_ids = torch.zeros((1, tokens), dtype=torch.long)
    index = torch.full((len(rows), seq_len), -1, dtype=torch.long)
    segment = torch.empty(tokens, dtype=torch.long)
    offset = 0
    for i, (row, n) in enumerate(zip(rows, lengths)):
        input_ids[0, offset:offset + n] = batch["input_ids"][row, :n]
        labels[0, offset:offset + n] = batch["labels"][row, :n]
        position_ids[0, offset:offset + n] = torch.arange(n)
        index[i, :n] = torch.arange(offset, offset + n)
        segment[offset:offset + n] = i
        offset += n
    if offset < tokens:  # the padding: its own block(s), never attended to by a sequence
        position_ids[0, offset:] = torch.arange(tokens - offset)
    picked = {k: batch[k][rows] for k in ("loss_mask", "rollout_log_prob", "advantages", "positive", "sequence_index")
              if k in batch}
    mb = MicroBatch(input_ids=input_ids, position_ids=position_ids, labels=labels, unpack_index=index, **picked)
    if attention == "mask":
        # each padding token is a block of its own (attending to itself only: no empty softmax row)
        segment[offset:] = torch.arange(len(rows), len(rows) + tokens - offset)
        same = segment[:, None] == segment[None, :]
        causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
        mb.attention_mask = ~(same & causal)[None, None]
    else:
        from megatron.core.packed_seq_params import PackedSeqParams

        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        if offset < tokens:
            bounds.append(tokens)
        cu = torch.tensor(bounds, dtype=torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        mb.packed_seq_params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                               max_seqlen_q=longest, max_seqlen_kv=longest)
    return mb
