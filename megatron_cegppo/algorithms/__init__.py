"""RL algorithm pieces around the policy loss: group advantages, DAPO dynamic sampling, and
packing sequences into token-budget micro-batches (``algorithms.packing``). The KL penalty is
loss math: ``megatron_cegppo.losses.kl``."""

from .advantages import group_all_equal, grpo_advantages, reshape_groups
from .dynamic_sampling import DynamicSampler, DynamicSamplingResult, dynamic_sampling_filter
from .packing import pack_microbatches, packing_stats, split_to_multiple

__all__ = [
    "group_all_equal",
    "grpo_advantages",
    "reshape_groups",
    "DynamicSampler",
    "DynamicSamplingResult",
    "dynamic_sampling_filter",
    "pack_microbatches",
    "packing_stats",
    "split_to_multiple",
]
