"""Megatron-core GPT models: layer specs chosen at run time, model chunks per pipeline stage."""

from megatron_cegppo.models.gpt import build_gpt_model_chunks, gpt_layer_spec

__all__ = ["build_gpt_model_chunks", "gpt_layer_spec"]
