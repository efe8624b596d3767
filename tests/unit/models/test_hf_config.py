"""``transformer_config_from_hf``: activation recomputation and bf16 settings; the rope scaling
``HFArchitecture`` reads."""

from __future__ import annotations

import pytest
import torch

from megatron_cegppo.models.hf_config import HFArchitecture, transformer_config_from_hf


@pytest.fixture
def arch():
    return HFArchitecture(model_type="qwen2", vocab_size=100, hidden_size=64, num_layers=4, num_heads=4,
                          num_kv_heads=2, head_dim=16, ffn_hidden_size=96, rms_norm_eps=1e-6, rope_theta=1e4,
                          max_position_embeddings=64, qkv_bias=True, tie_word_embeddings=False)


def test_no_recompute_by_default(arch):
    config = transformer_config_from_hf(arch)
    assert config.recompute_granularity is None and config.recompute_method is None


def test_selective_recomputes_core_attention(arch):
    config = transformer_config_from_hf(arch, recompute="selective")
    assert config.recompute_granularity == "selective"
    assert config.recompute_modules == ["core_attn"]
    assert config.recompute_method is None and config.recompute_num_layers is None


@pytest.mark.parametrize("pp", [1, 2])
def test_full_recomputes_every_layer(arch, pp):
    config = transformer_config_from_hf(arch, pp=pp, recompute="full")
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == \
        ("full", "uniform", 1)


def test_unknown_recompute_is_named(arch):
    with pytest.raises(ValueError, match="recompute must be one of"):
        transformer_config_from_hf(arch, recompute="block")


def test_bf16_params_and_pipeline_dtype(arch):
    config = transformer_config_from_hf(arch, params_dtype=torch.bfloat16)
    assert config.bf16 and config.params_dtype == config.pipeline_dtype == torch.bfloat16
    assert not transformer_config_from_hf(arch).bf16


def _llama(rope):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                       intermediate_size=96, vocab_size=100, max_position_embeddings=131072, rope_parameters=rope)


LLAMA31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_llama3_rope_scaling_is_read():
    arch = HFArchitecture.of(_llama(LLAMA31))
    assert arch.rope_scaling_factor == 8.0 and arch.rope_theta == 500000.0
    assert HFArchitecture.of(_llama({"rope_type": "default", "rope_theta": 1e4})).rope_scaling_factor is None


@pytest.mark.parametrize("rope,match", [
    ({**LLAMA31, "high_freq_factor": 2.0}, "high_freq_factor=2.0 is not supported"),
    ({**LLAMA31, "original_max_position_embeddings": 4096}, "original_max_position_embeddings=4096"),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 4096},
     "rope_type 'yarn' is not supported"),
])
def test_unsupported_rope_scaling_is_named(rope, match):
    with pytest.raises(ValueError, match=match):
        HFArchitecture.of(_llama(rope))
