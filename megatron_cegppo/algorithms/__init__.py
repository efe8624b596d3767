"""RL algorithm pieces around the policy loss: group advantages, KL penalty, DAPO dynamic
sampling, and packing sequences into token-budget micro-batches (``algorithms.packing``)."""

from .advantages import KL_KINDS, group_all_equal, grpo_advantages, kl_penalty, reshape_groups
from .dynamic_sampling import DynamicSampler, DynamicSamplingResult, dynamic_sampling_filter
from .packing import pack_microbatches, packing_stats, split_to_multiple

__all__ = [
    "KL_KINDS",
    "group_all_equal",
    "grpo_advantages",
    "kl_penalty",
    "reshape_groups",
    "DynamicSampler",
    "DynamicSamplingResult",
    "dynamic_sampling_filter",
    "pack_microbatches",
    "packing_stats",
    "split_to_multiple",
]
