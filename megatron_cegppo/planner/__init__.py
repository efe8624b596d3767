"""Per-GPU memory of a run, estimated before submission: parameters, gradients and the
distributed optimizer's state (checked against megatron-core's own counts), activations
(Korthikanti et al.'s count, with and without recomputation), the log-prob/entropy buffers of
the chosen implementation, and vLLM's weights and KV cache in the generation phase."""

from megatron_cegppo.planner.activations import (
    MEGATRON_LOCAL,
    PAPER_GPT,
    TRANSFORMER_ENGINE,
    LayerImplementation,
    layer_activation_bytes,
    packed_mask_bytes,
    pipeline_in_flight,
    stage_activation_bytes,
)
from megatron_cegppo.planner.generation import generation_memory, kv_cache_bytes_per_token, vllm_weight_bytes
from megatron_cegppo.planner.logprob import head_buffer_bytes
from megatron_cegppo.planner.parameters import RankParameters, layer_parameters, rank_parameters, training_state_bytes
from megatron_cegppo.planner.plan import Plan, make_plan, packed_microbatches, read_architecture, total_parameters
from megatron_cegppo.planner.report import format_plan

__all__ = [
    "LayerImplementation", "MEGATRON_LOCAL", "PAPER_GPT", "Plan", "RankParameters", "TRANSFORMER_ENGINE",
    "format_plan", "generation_memory", "head_buffer_bytes", "kv_cache_bytes_per_token", "layer_activation_bytes",
    "layer_parameters", "make_plan", "packed_mask_bytes", "packed_microbatches", "pipeline_in_flight",
    "rank_parameters", "read_architecture", "stage_activation_bytes", "total_parameters", "training_state_bytes", "vllm_weight_bytes",
]
