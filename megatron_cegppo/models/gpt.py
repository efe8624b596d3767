"""Builds megatron-core ``GPTModel`` chunks for this rank's pipeline stage(s)."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_cegppo.platform import current_platform

# GPTModel takes a factor even with RoPE scaling off and reads it only when scaling is on;
# without scaling it gets megatron's own default (Llama 3.1's 8), which no model here uses
UNUSED_ROPE_SCALING_FACTOR = 8.0

def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def gpt_layer_spec(normalization: str = "RMSNorm", qk_layernorm: bool = False, use_te: Optional[bool] = None):
    """Transformer-engine's fused layer spec where the platform found it importable, megatron's
    local spec (torch norms and linears) otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = current_platform().layer_impl == "transformer_engine"
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)


def build_gpt_model_chunks(
    config,
    *,
    vocab_size: int,
    max_sequence_length: int,
    share_embeddings_and_output_weights: bool = False,
    rotary_base: int = 10000,
    rope_scaling_factor: Optional[float] = None,
    layer_spec=None,
) -> list[torch.nn.Module]:
    """One ``GPTModel`` per virtual pipeline stage held by this rank (a list of one without
    interleaving), each knowing whether it holds the embedding (first stage) or the output
    layer (last stage). ``vocab_size`` is the padded size (a multiple of the TP size)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    spec = layer_spec if layer_spec is not None else gpt_layer_spec(config.normalization)
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=spec,
                vocab_size=vocab_size,
                max_sequence_length=max_sequence_length,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                share_embeddings_and_output_weights=share_embeddings_and_output_weights,
                position_embedding_type="rope",
                rotary_base=rotary_base,
                rope_scaling=rope_scaling_factor is not None,
                rope_scaling_factor=rope_scaling_factor or UNUSED_ROPE_SCALING_FACTOR,
                vp_stage=stage,
            )
        )
    device = current_platform().device
    for chunk in chunks:
        _cast_params(chunk, config.params_dtype)
        if device.type != "cpu":
            # megatron's torch norms are built on the CPU whatever the config says (Megatron-LM's
            # training.get_model moves every chunk the same way)
            chunk.to(device)
    return chunks


def _cast_params(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Gives every parameter ``dtype``. The local spec's torch norms
    (``megatron.core.transformer.torch_norm.WrappedTorchNorm``) ignore ``params_dtype`` and
    stay fp32 in a bf16 model (transformer-engine's norms do not; megatron's Float16Module,
    which we do not use, casts everything). Mixed dtypes break megatron's distributed
    optimizer: it reorders each parameter group fp32-first, so
    ``_get_main_param_and_optimizer_states`` (checkpoints) answers with another parameter's
    master weight and Adam state."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def build_gpt_from_hf(hf_config, *, tp: int, pp: int, vpp: Optional[int] = None,
                      sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                      recompute: str = "none", vocab_divisible_by: int = 128, **config_overrides):
    """GPTModel chunks shaped like an HF Qwen2/Llama model, for this rank's stage(s).
    ``recompute``: activation recomputation, ``none | selective | full``.

    Returns ``(arch, transformer_config, chunks, padded_vocab)``. Megatron's parallel state
    must be initialised with the same ``tp``/``pp``/``vpp``."""
    from megatron_cegppo.models.hf_config import HFArchitecture, padded_vocab_size, transformer_config_from_hf

    arch = HFArchitecture.of(hf_config)
    config = transformer_config_from_hf(arch, tp=tp, pp=pp, vpp=vpp, sequence_parallel=sequence_parallel,
                                        params_dtype=params_dtype, recompute=recompute, **config_overrides)
    padded = padded_vocab_size(arch.vocab_size, tp, vocab_divisible_by)
    chunks = build_gpt_model_chunks(
        config, vocab_size=padded, max_sequence_length=arch.max_position_embeddings,
        share_embeddings_and_output_weights=arch.tie_word_embeddings, rotary_base=arch.rope_theta,
        rope_scaling_factor=arch.rope_scaling_factor,
    )
    return arch, config, chunks, padded
