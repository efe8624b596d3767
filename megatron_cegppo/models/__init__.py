"""Megatron-core GPT models: layer specs chosen at run time, model chunks per pipeline stage,
and the Hugging Face (Qwen2 / Llama) weight mapping.

The names are imported on first use: the planner and the preflight read
:mod:`megatron_cegppo.models.hf_config` before torch starts."""

from importlib import import_module

_HOMES = {
    "build_gpt_from_hf": "gpt", "build_gpt_model_chunks": "gpt", "gpt_layer_spec": "gpt",
    "HFArchitecture": "hf_config", "padded_vocab_size": "hf_config", "transformer_config_from_hf": "hf_config",
    "export_hf_weights": "hf_io", "import_hf_weights": "hf_io", "read_hf_config": "hf_io", "read_hf_state": "hf_io",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
