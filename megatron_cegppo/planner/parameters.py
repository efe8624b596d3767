"""Parameters, gradients and the distributed optimizer's state per rank, counted the way
megatron-core lays the model out (checked against megatron's own modules in tests)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_cegppo.models.hf_config import HFArchitecture, padded_vocab_size


@dataclass(frozen=True)
class RankParameters:
    """Parameter elements held by one rank (the stage holding the most)."""

    embedding: int
    layers: int
    final_norm: int
    output_layer: int

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.final_norm + self.output_layer


def layer_parameters(arch: HFArchitecture, tp: int) -> int:
    """Elements of one transformer layer on one tensor-parallel rank."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    qkv = (q + 2 * kv) * h // tp + ((q + 2 * kv) // tp if arch.qkv_bias else 0)
    proj = q * h // tp
    mlp = 2 * arch.ffn_hidden_size * h // tp + arch.ffn_hidden_size * h // tp
    norms = 2 * h  # replicated over TP
    return qkv + proj + mlp + norms


def rank_parameters(arch: HFArchitecture, *, tp: int, pp: int, stage: int, vocab_divisible_by: int = 128) -> RankParameters:
    """What the rank of pipeline ``stage`` holds (layers split evenly over stages)."""
    if arch.num_layers % pp:
        raise ValueError(f"{arch.num_layers} layers do not split over {pp} pipeline stages")
    vocab = padded_vocab_size(arch.vocab_size, tp, vocab_divisible_by) // tp * arch.hidden_size
    first, last = stage == 0, stage == pp - 1
    # tied embeddings: the last stage keeps its own copy of the embedding as the output layer
    # when it is not also the first stage
    output = vocab if last and (not arch.tie_word_embeddings or not first) else 0
    return RankParameters(
        embedding=vocab if first else 0,
        layers=layer_parameters(arch, tp) * (arch.num_layers // pp),
        final_norm=arch.hidden_size if last else 0,
        output_layer=output,
    )


@dataclass(frozen=True)
class TrainingStateBytes:
    params: int
    grads: int
    optimizer: int  # fp32 main params (when params are not fp32) + Adam's two moments, sharded over DP

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def training_state_bytes(numel: int, *, dp: int, bf16: bool, grad_fp32: bool = True) -> TrainingStateBytes:
    """Bytes of one rank's parameters (bf16 or fp32), gradient buffer (fp32 by default, as
    ``grad_reduce_in_fp32``) and distributed-optimizer state (fp32 master copy for bf16 params,
    plus exp_avg and exp_avg_sq, each split over the data-parallel ranks)."""
    # megatron's distributed-optimizer buffer pads the end of a bucket to a multiple of
    # lcm(128, DP) so that it splits evenly. Without overlap_grad_reduce (this project's DDP
    # setting) megatron makes one bucket per dtype, so this is exact; with overlapped buckets
    # it would add at most lcm(128, DP) elements per extra bucket.
    multiple = math.lcm(128, dp) if dp > 1 else 1
    per_shard = -(-numel // multiple) * multiple // dp
    optimizer = per_shard * 4 * (3 if bf16 else 2)
    return TrainingStateBytes(params=numel * (2 if bf16 else 4), grads=numel * (4 if grad_fp32 else 2),
                              optimizer=optimizer)
