"""Megatron-core GPT models: layer specs chosen at run time, model chunks per pipeline stage,
and the Hugging Face (Qwen2 / Llama) weight mapping."""

from megatron_cegppo.models.gpt import build_gpt_from_hf, build_gpt_model_chunks, gpt_layer_spec
from megatron_cegppo.models.hf_config import HFArchitecture, padded_vocab_size, transformer_config_from_hf
from megatron_cegppo.models.hf_io import export_hf_weights, import_hf_weights, read_hf_config, read_hf_state

__all__ = [
    "HFArchitecture",
    "build_gpt_from_hf",
    "build_gpt_model_chunks",
    "export_hf_weights",
    "gpt_layer_spec",
    "import_hf_weights",
    "padded_vocab_size",
    "read_hf_config",
    "read_hf_state",
    "transformer_config_from_hf",
]
