"""Memory of the generation phase: vLLM's weights at its tensor-parallel size and its KV
cache, inside the share of the GPU that ``gpu_memory_utilization`` gives it."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_cegppo.models.hf_config import HFArchitecture

# vLLM pads its vocabulary to a multiple of 64 (VocabParallelEmbedding's default padding)
_VLLM_VOCAB_MULTIPLE = 64
# vLLM's default chunked-prefill budget of tokens per forward step, and sequences per step
_MAX_BATCHED_TOKENS = 8192
_MAX_NUM_SEQS = 256
# CUDA graphs captured for decoding (vLLM logs about 1-2 GiB for models of this size)
_CUDA_GRAPH_BYTES = 2 << 30


def _kv_heads_per_rank(arch: HFArchitecture, tp: int) -> int:
    # KV heads are split over TP ranks, or replicated when there are fewer heads than ranks
    return max(1, arch.num_kv_heads // tp)


def vllm_weight_bytes(arch: HFArchitecture, tp: int, dtype_bytes: int = 2) -> int:
    """One vLLM rank's weights (bf16)."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    vocab = -(-arch.vocab_size // _VLLM_VOCAB_MULTIPLE) * _VLLM_VOCAB_MULTIPLE
    q = arch.num_heads * d // tp
    kv = _kv_heads_per_rank(arch, tp) * d
    layer = (q + 2 * kv) * h + q * h + 3 * f * h // tp + 2 * h
    if arch.qkv_bias:
        layer += q + 2 * kv
    embeddings = vocab * h // tp * (1 if arch.tie_word_embeddings else 2)
    return (arch.num_layers * layer + embeddings + h) * dtype_bytes


def kv_cache_bytes_per_token(arch: HFArchitecture, tp: int, dtype_bytes: int = 2) -> int:
    """K and V of every layer for one token, on one vLLM rank."""
    return 2 * arch.num_layers * _kv_heads_per_rank(arch, tp) * arch.head_dim * dtype_bytes


def vllm_workspace_bytes(arch: HFArchitecture, tp: int, dtype_bytes: int = 2) -> int:
    """The peak of vLLM's own forward pass (what its memory profiling reserves beside the
    KV cache): one prefill chunk's largest activations, the sampler's fp32 logits for a full
    batch of sequences, and the captured CUDA graphs."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    q = arch.num_heads * arch.head_dim // tp
    widest = max(2 * f // tp, q + 2 * _kv_heads_per_rank(arch, tp) * arch.head_dim, h)
    activations = _MAX_BATCHED_TOKENS * (2 * h + widest) * dtype_bytes
    logits = 2 * _MAX_NUM_SEQS * arch.vocab_size * 4
    return activations + logits + _CUDA_GRAPH_BYTES


@dataclass(frozen=True)
class GenerationMemory:
    budget: int  # gpu_memory_utilization x the GPU
    weights: int
    workspace: int
    kv_per_token: int
    sequences: int  # sequences one engine generates per rollout round
    max_model_len: int

    @property
    def kv_cache(self) -> int:
        return max(0, self.budget - self.weights - self.workspace)

    @property
    def kv_tokens(self) -> int:
        return self.kv_cache // self.kv_per_token

    @property
    def concurrent_sequences(self) -> int:
        """Sequences of full length that run at once (vLLM needs at least one to start)."""
        return self.kv_tokens // self.max_model_len

    @property
    def kv_needed_for_all(self) -> int:
        """KV bytes that would let every sequence of the round run at once at full length."""
        return self.sequences * self.max_model_len * self.kv_per_token


def generation_memory(arch: HFArchitecture, *, rollout_tp: int, world_size: int, gpu_memory: int,
                      gpu_memory_utilization: float, prompts_per_step: int, n: int,
                      max_model_len: int) -> GenerationMemory:
    engines = max(1, world_size // rollout_tp)
    return GenerationMemory(
        budget=int(gpu_memory_utilization * gpu_memory),
        weights=vllm_weight_bytes(arch, rollout_tp),
        workspace=vllm_workspace_bytes(arch, rollout_tp),
        kv_per_token=kv_cache_bytes_per_token(arch, rollout_tp),
        sequences=-(-prompts_per_step * n // engines),
        max_model_len=max_model_len,
    )
