"""Memory of the last pipeline stage's head: the final norm, the output layer and the
vocab-parallel log-prob/entropy computation, per implementation (see
``megatron_cegppo.parallel.vocab_parallel``; the terms follow what its autograd functions
save and allocate, and benchmarks/results/vocab_parallel_cpu.md measures them)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_cegppo.parallel.chunking import LOGITS_CHUNK_ELEMENTS


@dataclass(frozen=True)
class HeadBuffers:
    saved: int  # kept from forward to backward
    transient: int  # allocated during the head's backward, freed after it

    @property
    def peak(self) -> int:
        return self.saved + self.transient


def logprob_saved_bytes(*, tokens: int, hidden: int, shard: int, logprob_impl: str, dtype_bytes: int = 2) -> int:
    """What the log-prob/entropy function itself keeps for backward: its input (the logits
    shard, or the hidden states for the fused variant, whose weight is a parameter), the int64
    labels and fp32 log-sum-exp and entropy per token."""
    per_token = 8 + 2 * 4
    if logprob_impl == "logits":
        return dtype_bytes * tokens * shard + per_token * tokens
    if logprob_impl == "fused":
        return dtype_bytes * tokens * hidden + per_token * tokens
    raise ValueError(f"logprob_impl must be fused or logits, got {logprob_impl!r}")


def head_buffer_bytes(*, tokens: int, hidden: int, padded_vocab: int, tp: int, sequence_parallel: bool,
                      logprob_impl: str, dtype_bytes: int = 2, chunk_elements: int = LOGITS_CHUNK_ELEMENTS) -> HeadBuffers:
    """One micro-batch of ``tokens`` on the last stage, per tensor-parallel rank."""
    e, shard = dtype_bytes, padded_vocab // tp
    local_hidden = e * tokens * hidden // (tp if sequence_parallel else 1)
    saved = logprob_saved_bytes(tokens=tokens, hidden=hidden, shard=shard, logprob_impl=logprob_impl,
                                dtype_bytes=e)
    scratch = 4 * chunk_elements  # one fp32 chunk of logits
    norm_input = local_hidden
    if logprob_impl == "logits":
        logits = e * tokens * shard
        # the output layer keeps its input; our function keeps the logits; backward makes
        # their gradient, the output weight's gradient and the hidden gradient, and works
        # on two fp32 chunks at a time
        saved += norm_input + local_hidden
        transient = logits + e * shard * hidden + e * tokens * hidden + 2 * scratch
    elif logprob_impl == "fused":
        # the hidden states (gathered over the sequence when it is split) and [tokens]
        # statistics; backward recomputes each chunk's logits, accumulates the weight's
        # gradient in fp32 and works on three fp32 chunks at a time
        saved += norm_input
        transient = e * tokens * hidden + 4 * shard * hidden + 3 * scratch
    return HeadBuffers(saved=saved, transient=transient)
