"""Megatron ``TransformerConfig`` from a Hugging Face config of the Qwen2 / Llama families."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


from megatron_cegppo.config.schema import RECOMPUTE_MODES

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


@dataclass(frozen=True)
class HFArchitecture:
    """What the weight mapping and GPTModel need to know about an HF model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    qkv_bias: bool
    tie_word_embeddings: bool
    rope_scaling_factor: Optional[float] = None  # Llama 3.x frequency scaling; None: none

    @classmethod
    def of(cls, hf_config: Any) -> "HFArchitecture":
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}"
            )
        rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = _llama3_rope_factor(rope)
        elif rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, llama3)")
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None))
        if theta is None:
            raise ValueError("the HF config gives no rope_theta")
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        qkv_bias = True if model_type == "qwen2" else bool(getattr(hf_config, "attention_bias", False))
        if model_type == "llama" and getattr(hf_config, "mlp_bias", False):
            raise ValueError("Llama configs with mlp_bias=True are not supported")
        return cls(
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            ffn_hidden_size=hf_config.intermediate_size,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=float(theta),
            max_position_embeddings=hf_config.max_position_embeddings,
            qkv_bias=qkv_bias,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            rope_scaling_factor=scaling,
        )


# Llama 3.x frequency scaling as megatron-core implements it
# (``RotaryEmbedding._apply_scaling``): only the factor is configurable there
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _llama3_rope_factor(rope: dict) -> float:
    for key, expected in _LLAMA3_FIXED.items():
        if float(rope.get(key, expected)) != expected:
            raise ValueError(f"llama3 rope scaling with {key}={rope[key]} is not supported: megatron-core "
                             f"fixes it at {expected:g}")
    if "factor" not in rope:
        raise ValueError("llama3 rope scaling without a factor")
    return float(rope["factor"])


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def recompute_settings(recompute: str) -> dict:
    """megatron-core's activation-recomputation fields for ``none | selective | full``.

    selective: core attention only (the local spec's ``[b, heads, s, s]`` scores and softmax)
    is recomputed in backward: the activations that grow with s^2, cheap to redo
    (transformer-engine's fused attention keeps no such matrix: little to save there).
    full: only each layer's input is kept and the whole layer is recomputed (uniform method,
    one layer per unit): the most memory saved, for about one extra forward pass."""
    if recompute == "none":
        return {}
    if recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    if recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    raise ValueError(f"recompute must be one of {list(RECOMPUTE_MODES)}, got {recompute!r}")


def transformer_config_from_hf(
    arch: HFArchitecture,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: Optional[int] = None,
    sequence_parallel: bool = False,
    params_dtype: Any = None,
    recompute: str = "none",
    **overrides: Any,
):
    """A megatron-core ``TransformerConfig`` computing what the HF model computes.

    ``params_dtype=torch.bfloat16`` gives bf16 parameters and activations (``bf16=True``); the
    fp32 master weights live in the optimizer (default: float32). ``recompute``: see
    :func:`recompute_settings`."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    params_dtype = torch.float32 if params_dtype is None else params_dtype
    if arch.num_layers % (pp * (vpp or 1)):
        raise ValueError(
            f"{arch.num_layers} layers do not divide into pipeline size {pp} x virtual stages {vpp or 1}"
        )
    if arch.num_kv_heads % tp or arch.num_heads % tp:
        raise ValueError(
            f"tensor-parallel size {tp} must divide the {arch.num_heads} attention heads and the "
            f"{arch.num_kv_heads} key/value heads"
        )
    from megatron_cegppo.platform import current_platform

    platform = current_platform()
    fused = platform.fused_kernels
    kwargs = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads, num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim, ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias, hidden_dropout=0.0, attention_dropout=0.0,
        # fused kernels exist only on the GPU
        bias_activation_fusion=fused, masked_softmax_fusion=platform.fused_softmax, bias_dropout_fusion=fused,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=not platform.is_cuda, params_dtype=params_dtype, pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sequence_parallel,
        batch_p2p_comm=platform.batch_p2p_comm,
        **recompute_settings(recompute),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
