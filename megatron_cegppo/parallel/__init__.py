"""Tensor/pipeline-parallel pieces: vocab-parallel log-probs and entropy, the pipeline loss,
and the CPU compatibility layer for megatron-core."""

from megatron_cegppo.parallel.vocab_parallel import (
    VocabShard,
    fused_vocab_parallel_logprobs_entropy,
    vocab_parallel_logprobs_entropy,
)

__all__ = [
    "VocabShard",
    "fused_vocab_parallel_logprobs_entropy",
    "vocab_parallel_logprobs_entropy",
]
