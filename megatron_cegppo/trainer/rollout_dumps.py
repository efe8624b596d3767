"""What a step sampled, for a person to read (:mod:`megatron_cegppo.tracking.rollout_dump`):
the first groups' prompts and responses with their rewards, advantages and lengths, and each
response's mean |vLLM - Megatron| log-prob mismatch, gathered from the last pipeline stage."""

from __future__ import annotations

from typing import Any


from megatron_cegppo.platform import Layout
from megatron_cegppo.trainer.collectives import gather_objects
from megatron_cegppo.trainer.step_phases import MiniBatches, StepRollout


def sequence_mismatch(layout: Layout, minibatches: MiniBatches) -> dict[int, float]:
    """Per response (its index in the step): the mean |rollout - recomputed| log-prob over its
    tokens, on every rank (each data-parallel replica's last stage holds its share)."""
    mine = None
    if layout.is_last_stage and layout.tp_rank == 0:
        mine = {}
        for micro in minibatches:
            for m in micro:
                mask = m.loss_mask.float()
                diff = ((m.rollout_log_prob - m.old_log_prob).abs() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
                mine.update(zip(m.sequence_index.tolist(), diff.tolist()))
    merged: dict[int, float] = {}
    for part in gather_objects(layout, mine):
        merged.update(part or {})
    return merged


def rollout_dump_rows(rollout: StepRollout, mismatch: dict[int, float], tokenizer: Any, *, groups: int,
                      group_size: int) -> list[dict]:
    rewards = rollout.rewards.reshape(-1)
    rows = []
    for i, c in enumerate(rollout.completions[: groups * group_size]):
        rows.append({
            "group": i // group_size, "prompt_index": c.prompt_index,
            "prompt": tokenizer.decode(rollout.prompts[c.prompt_index]), "response": tokenizer.decode(c.token_ids),
            "reward": float(rewards[i]), "advantage": float(rollout.advantages[i]), "length": len(c.token_ids),
            "logprob_mismatch_mean": mismatch.get(i), "finish_reason": c.finish_reason,
        })
    return rows


__all__ = ["rollout_dump_rows", "sequence_mismatch"]
