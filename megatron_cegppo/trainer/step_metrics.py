"""A step's metrics: the rollout's rewards and lengths, the loss function's per-micro-batch
metrics from the last pipeline stage, tokens computed against tokens used, combined over the
ranks so that the result does not depend on the layout."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from megatron_cegppo.platform import Layout
from megatron_cegppo.trainer.collectives import gather_objects
from megatron_cegppo.trainer.policy_update import UpdateResult
from megatron_cegppo.trainer.step_phases import MiniBatches, StepRollout


def token_counts(layout: Layout, minibatches: MiniBatches, *, forward_passes: int) -> dict:
    """Real and computed tokens of the step's ``forward_passes`` passes over the micro-batches
    (the recompute, the reference and every epoch's update), over all data-parallel replicas:
    what padding costs."""
    every = [m for micro in minibatches for m in micro]
    counts = layout.platform.tensor([sum(m.real_tokens for m in every) * forward_passes,
                                     sum(m.computed_tokens for m in every) * forward_passes], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(counts, group=layout.dp_group)
    real, computed = (float(x) for x in counts.tolist())
    return {"tokens/real": real, "tokens/computed": computed, "tokens/computed_per_real": computed / max(real, 1.0)}


def merge_across_ranks(layout: Layout, local: dict, common: dict) -> dict:
    """The last pipeline stage's metrics, one report per data-parallel replica (TP rank 0),
    combined as micro-batches are: sums of counts, token-weighted means, maxima."""
    from megatron_cegppo.parallel.pipeline_loss import reduce_microbatch_metrics

    mine = local if (layout.is_last_stage and layout.tp_rank == 0) else None
    merged = dict(common)
    merged.update(reduce_microbatch_metrics([p for p in gather_objects(layout, mine) if p]))
    return merged


def step_metrics(layout: Layout, rollout: StepRollout, minibatches: MiniBatches, update: UpdateResult, *,
                 mismatch: dict, seen_rewards: list, sampling_stats: dict, lr: float, nonfinite_skipped: int,
                 forward_passes: int, correct_score: float) -> dict:
    from megatron_cegppo.parallel.pipeline_loss import reduce_microbatch_metrics

    local = dict(reduce_microbatch_metrics(update.stores)) if update.stores else {}
    local.update(mismatch)
    lengths = [len(c.token_ids) for c in rollout.completions]
    common = {
        "reward_mean": float(np.mean(seen_rewards)),
        # every sampled response's: the policy's accuracy whatever the reward's scale
        "accuracy": float(np.mean(np.asarray(seen_rewards) == correct_score)),
        "reward_mean_trained": float(rollout.rewards.mean()),
        "response_length_mean": float(np.mean(lengths)),
        "grad_norm": float(np.mean(update.grad_norms)) if update.grad_norms else 0.0,
        "lr": lr,
        "nonfinite_skipped": float(nonfinite_skipped),
        "tokens": sum(lengths) + sum(len(rollout.prompts[c.prompt_index]) for c in rollout.completions),
        **token_counts(layout, minibatches, forward_passes=forward_passes),
        **sampling_stats,
    }
    return merge_across_ranks(layout, local, common)
