"""Token batches for Megatron from prompts and sampled completions."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

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


def build_microbatches(
    prompts: Mapping[int, Sequence[int]], completions: Sequence[Completion], advantages: torch.Tensor, *,
    pad_id: int, seq_len: int, micro_batch_size: int, place: Callable[[dict], dict],
) -> list[dict[str, torch.Tensor]]:
    """One mini-batch of this rank's ``completions`` as micro-batches of ``micro_batch_size``
    rows: the token batch of :func:`build_token_batch`, plus ``advantages`` (one per completion)
    spread over the positions. The batch is built and cut on the host, and each micro-batch is
    handed to ``place`` (the platform's placement step), so every tensor the model, the loss
    and the collectives see lives where the model is."""
    if len(advantages) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(advantages)} advantages")
    batch = build_token_batch(prompts, completions, pad_id=pad_id, seq_len=seq_len)
    batch["advantages"] = advantages.to(torch.float32).unsqueeze(1).expand(-1, seq_len).contiguous()
    return [place({k: v[i:i + micro_batch_size] for k, v in batch.items()})
            for i in range(0, len(completions), micro_batch_size)]
