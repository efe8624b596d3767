"""Token batches for Megatron from prompts and sampled completions."""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_cegppo.rollout.engine import Completion


def build_token_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Completion], *, pad_id: int, seq_len: int
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
