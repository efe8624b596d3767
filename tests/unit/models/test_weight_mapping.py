"""HF <-> megatron mapping on full tensors: every HF tensor comes back exactly."""

from __future__ import annotations

import pytest
import torch

from megatron_cegppo.models.hf_config import HFArchitecture, padded_vocab_size
from megatron_cegppo.models.weight_mapping import canonical_name, hf_to_megatron, megatron_names, megatron_to_hf


def tiny_hf_model(model_type: str, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls_config, cls_model = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[model_type]
    config = cls_config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        num_hidden_layers=2, intermediate_size=96, vocab_size=100,
                        max_position_embeddings=64, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return cls_model(config)


@pytest.mark.parametrize("model_type,tied", [("qwen2", False), ("qwen2", True), ("llama", False)])
def test_round_trip_reproduces_every_hf_tensor(model_type, tied):
    model = tiny_hf_model(model_type, tied)
    arch = HFArchitecture.of(model.config)
    hf_state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    full = hf_to_megatron(hf_state, arch, padded_vocab_size(arch.vocab_size, tp=2))
    assert list(full) == megatron_names(arch)
    assert full["embedding.word_embeddings.weight"].shape[0] == 256
    back = dict(pair for name, t in full.items() for pair in megatron_to_hf(name, t, arch))
    assert set(back) == set(hf_state)
    for name, tensor in hf_state.items():
        assert torch.equal(back[name], tensor), name


def test_qkv_rows_are_interleaved_per_query_group():
    model = tiny_hf_model("qwen2")
    arch = HFArchitecture.of(model.config)
    full = hf_to_megatron(model.state_dict(), arch, 128)
    qkv = full["decoder.layers.0.self_attention.linear_qkv.weight"]
    attn = model.model.layers[0].self_attn
    d, per_group = 16, 2 * 16  # 2 query heads per group
    group1 = qkv[(per_group + 2 * d):]
    assert torch.equal(group1[:per_group], attn.q_proj.weight[per_group:])
    assert torch.equal(group1[per_group:per_group + d], attn.k_proj.weight[d:])
    assert torch.equal(group1[per_group + d:], attn.v_proj.weight[d:])


def test_te_names_map_to_local_names():
    assert canonical_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == \
        "decoder.layers.3.input_layernorm.weight"
    assert canonical_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.0.pre_mlp_layernorm.weight"


def test_bad_inputs_are_named():
    model = tiny_hf_model("llama")
    arch = HFArchitecture.of(model.config)
    state = dict(model.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="up_proj"):
        hf_to_megatron(state, arch, 128)
    with pytest.raises(ValueError, match="exceeds the padded size"):
        hf_to_megatron(model.state_dict(), arch, 64)
    with pytest.raises(KeyError, match="no HF counterpart"):
        megatron_to_hf("decoder.layers.0.unknown.weight", torch.zeros(1), arch)
    bad = model.config
    bad.model_type = "gpt2"
    with pytest.raises(ValueError, match="not supported"):
        HFArchitecture.of(bad)
