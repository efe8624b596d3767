"""``transformer_config_from_hf``: activation recomputation and bf16 settings."""

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
