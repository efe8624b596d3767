"""RL algorithm pieces around the policy loss: group advantages, KL penalty, DAPO dynamic
sampling, and minibatch/microbatch splitting."""

from .advantages import KL_KINDS, group_all_equal, grpo_advantages, kl_penalty, reshape_groups
from .dynamic_sampling import DynamicSampler, DynamicSamplingResult, dynamic_sampling_filter
from .minibatch import microbatches, split_minibatches

__all__ = [
    "KL_KINDS",
    "group_all_equal",
    "grpo_advantages",
    "kl_penalty",
    "reshape_groups",
    "DynamicSampler",
    "DynamicSamplingResult",
    "dynamic_sampling_filter",
    "microbatches",
    "split_minibatches",
]
