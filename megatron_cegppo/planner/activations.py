"""Activation memory of training, counted tensor by tensor the way Korthikanti et al.
("Reducing Activation Recomputation in Large Transformer Models", 2022) count it, generalised
to this project's models (grouped-query attention, SwiGLU, RMSNorm, no dropout).

The paper's count for its GPT layer is ``s*b*h*(34 + 5*a*s/h)`` bytes in 16-bit activations,
divided by the tensor-parallel size ``t`` with sequence parallelism, ``34*s*b*h/t`` with
selective recomputation and ``2*s*b*h/t`` per layer with full recomputation. The same terms,
named below, give exactly that for the paper's layer (a test checks it) and the bytes that
megatron-core's local layers save for backward on the CPU (another test measures them).

Packed micro-batches (``algorithm.max_tokens_per_microbatch``) are one row of ``T`` tokens
holding several sequences: every term is that of a micro-batch of 1 x ``T``. With flash
attention (transformer-engine's THD format over ``cu_seqlens``) nothing is quadratic in ``T``;
megatron's local attention keeps its ``[T, T]`` scores per layer and, instead of a causal mask
of its own per layer, the micro-batch's block-diagonal mask (``[T, T]`` bool, shared by every
layer: :func:`packed_mask_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_cegppo.config.schema import RECOMPUTE_MODES
from megatron_cegppo.models.hf_config import HFArchitecture


@dataclass(frozen=True)
class LayerImplementation:
    """What a layer implementation keeps for backward, where implementations differ."""

    flash_attention: bool  # True: no [s, s] scores kept (flash / cuDNN attention)
    fused_swiglu: bool  # True: only the fc1 output is kept for the activation's backward
    fused_norm: bool  # True: a norm keeps its input (and [tokens] statistics) only
    expands_kv: bool  # True: K and V are repeated to all query heads before attention
    dropout: bool = False  # the paper's layer has dropout; Qwen2/Llama fine-tuning has none
    gelu_mlp: bool = False  # the paper's layer: a 4h GeLU MLP instead of SwiGLU
    # [tokens] norm statistics, the rotary cos/sin tables and the causal mask, which the paper
    # leaves out as small
    small_terms: bool = True
    # V is a view of the fused QKV projection's output, so keeping V keeps all of it (the
    # paper counts V alone)
    value_views_qkv: bool = True


# transformer-engine layers with flash attention (the GPU path)
TRANSFORMER_ENGINE = LayerImplementation(flash_attention=True, fused_swiglu=True, fused_norm=True, expands_kv=False)
# megatron-core's local spec with torch norms and unfused attention (the CPU path)
MEGATRON_LOCAL = LayerImplementation(flash_attention=False, fused_swiglu=False, fused_norm=False, expands_kv=True)
# the layer the paper counts: MHA, 4h GeLU MLP, LayerNorm, dropout, unfused attention
PAPER_GPT = LayerImplementation(flash_attention=False, fused_swiglu=True, fused_norm=True, expands_kv=False,
                                dropout=True, gelu_mlp=True, small_terms=False, value_views_qkv=False)


@dataclass(frozen=True)
class LayerActivations:
    """Bytes one transformer layer keeps for backward, for one micro-batch, on one rank."""

    replicated: int  # terms that sequence parallelism splits (already divided when it is on)
    sharded: int  # terms split over tensor-parallel ranks
    attention_scores: int  # the [s, s] terms that selective recomputation drops
    unsplit: int = 0  # the same on every rank whatever the layout (rotary tables, mask)

    @property
    def total(self) -> int:
        return self.replicated + self.sharded + self.attention_scores + self.unsplit


def layer_activation_bytes(arch: HFArchitecture, *, seq_len: int, micro_batch: int, tp: int = 1,
                           sequence_parallel: bool = False, recompute: str = "none", dtype_bytes: int = 2,
                           impl: LayerImplementation = TRANSFORMER_ENGINE, packed: bool = False) -> LayerActivations:
    """What one layer keeps for backward (without full recomputation; see
    :func:`stage_activation_bytes` for that). ``packed``: the micro-batch is one row of
    ``seq_len`` tokens (``micro_batch`` 1) whose attention mask comes with the micro-batch."""
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    if packed and micro_batch != 1:
        raise ValueError(f"a packed micro-batch is one row, got micro_batch={micro_batch}")
    e, n, s, b, h = dtype_bytes, seq_len * micro_batch, seq_len, micro_batch, arch.hidden_size
    q, kv_heads = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    # unfused attention repeats K and V to every query head inside core attention, which
    # selective recomputation recomputes: then only the unrepeated inputs are kept
    repeats_kv = impl.expands_kv and recompute != "selective"
    kv = q if repeats_kv else kv_heads
    a, f = arch.num_heads, arch.ffn_hidden_size

    # split by sequence parallelism, replicated over TP ranks without it
    norms = 2 * e * n * h * (1 if impl.fused_norm else 2)  # torch RMSNorm also keeps its output
    if impl.small_terms:
        norms += 2 * 4 * n  # fp32 reciprocal RMS per token
    qkv_input = e * n * h
    fc1_input = e * n * h
    dropout_masks = 2 * n * h if impl.dropout else 0  # 1 byte per element, after attention and MLP
    replicated = norms + qkv_input + fc1_input + dropout_masks

    # split by tensor parallelism
    query_key = e * n * (q + kv)  # inputs of Q K^T, after the rotary embedding
    if impl.value_views_qkv and not repeats_kv:
        value = e * n * (q + 2 * kv_heads)
    else:
        value = e * n * kv  # V alone, or its repeated copy (not a view)
    proj_input = e * n * q
    if impl.gelu_mlp:
        mlp = 2 * e * n * f  # GeLU input and fc2 input
    else:
        # fc1's output [gate, up] for SwiGLU's backward, fc2's input; unfused, also silu(gate)
        # and a contiguous copy of up for the product
        mlp = e * n * 2 * f + e * n * f + (0 if impl.fused_swiglu else 2 * e * n * f)
    sharded = query_key + value + proj_input + mlp

    # fp32 cos and sin for queries and keys, and the causal mask of unfused attention (packed:
    # the micro-batch's mask instead, counted once per micro-batch, not per layer)
    unsplit = 4 * 4 * s * arch.head_dim if impl.small_terms else 0
    if impl.small_terms and not impl.flash_attention and recompute != "selective" and not packed:
        unsplit += s * s
    if impl.small_terms and recompute == "selective":
        unsplit += 4  # an int32 argument the checkpointed core attention keeps
    scores = 0
    if impl.flash_attention:
        sharded += 4 * a * s * b  # fp32 log-sum-exp per query and head
    elif recompute != "selective":
        scores = e * a * s * s * b  # softmax output, the input of the product with V
        if impl.dropout:
            scores += a * s * s * b + e * a * s * s * b  # dropout mask and dropout output
    return LayerActivations(
        replicated=replicated // tp if sequence_parallel else replicated,
        sharded=sharded // tp, attention_scores=scores // tp, unsplit=unsplit,
    )


def packed_mask_bytes(tokens: int, impl: LayerImplementation = TRANSFORMER_ENGINE) -> int:
    """The block-diagonal causal mask of a packed micro-batch of ``tokens`` for unfused
    attention: ``[tokens, tokens]`` bool on every rank, an input of every layer (each keeps it
    for the masked softmax's backward, and full recomputation keeps it as a layer input).
    Flash attention takes ``cu_seqlens`` instead: nothing."""
    return 0 if impl.flash_attention else tokens * tokens


def pipeline_in_flight(pp: int, vpp: int | None, num_microbatches: int, stage: int = 0) -> float:
    """Micro-batches whose activations pipeline ``stage`` holds at its peak under 1F1B: the
    first stage ``pp`` of them, the last one; times ``1 + (pp - 1) / (pp * vpp)`` for the first
    stage with the interleaved schedule (the paper, section 4.2.3)."""
    held = min(pp - stage, num_microbatches)
    if vpp and vpp > 1 and stage == 0 and pp > 1:
        return held * (1 + (pp - 1) / (pp * vpp))
    return float(max(1, held))


def stage_activation_bytes(arch: HFArchitecture, *, layers: int, seq_len: int, micro_batch: int, tp: int,
                           sequence_parallel: bool, recompute: str, in_flight: float, dtype_bytes: int = 2,
                           impl: LayerImplementation = TRANSFORMER_ENGINE, packed: bool = False) -> int:
    """Peak activation bytes of a pipeline stage of ``layers`` layers holding ``in_flight``
    micro-batches. Full recomputation keeps each layer's input and, during backward, one
    layer's activations at a time. ``packed``: micro-batches of one row of ``seq_len`` tokens,
    each with its mask (:func:`packed_mask_bytes`) in every recomputation mode."""
    mask = int(in_flight * packed_mask_bytes(seq_len, impl)) if packed else 0
    if recompute == "full":
        layer_input = dtype_bytes * seq_len * micro_batch * arch.hidden_size
        if sequence_parallel:
            layer_input //= tp
        one_layer = layer_activation_bytes(arch, seq_len=seq_len, micro_batch=micro_batch, tp=tp,
                                           sequence_parallel=sequence_parallel, recompute="none",
                                           dtype_bytes=dtype_bytes, impl=impl, packed=packed).total
        return int(layers * in_flight * layer_input) + one_layer + mask
    per_layer = layer_activation_bytes(arch, seq_len=seq_len, micro_batch=micro_batch, tp=tp,
                                       sequence_parallel=sequence_parallel, recompute=recompute,
                                       dtype_bytes=dtype_bytes, impl=impl, packed=packed).total
    return int(layers * in_flight * per_layer) + mask
