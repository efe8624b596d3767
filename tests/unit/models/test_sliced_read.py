"""Reading a parameter's TP slice straight from an HF folder's safetensors files gives, element
for element, what slicing the fully mapped tensor gives (``tp_shard(hf_to_megatron(...))``),
for every parameter kind (fused QKV per query group, SwiGLU fc1 with stride 2, row-parallel
columns, padded vocabulary rows) at TP 1, 2 and 4, single-file and indexed folders, fp32 and
bf16 files, and reads split into small chunks. Missing tensors and wrong shapes name the
tensor and the file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from megatron_cegppo.models.hf_config import HFArchitecture, padded_vocab_size
from megatron_cegppo.models.hf_io import SafetensorsFolder, load_hf_param_slice
from megatron_cegppo.models.sharding import tp_shard
from megatron_cegppo.models.weight_mapping import hf_row_layout, hf_shapes, hf_to_megatron, megatron_names


def make_arch(tied: bool = False, qkv_bias: bool = True, vocab: int = 200) -> HFArchitecture:
    return HFArchitecture(model_type="qwen2", vocab_size=vocab, hidden_size=16, num_layers=2, num_heads=8,
                          num_kv_heads=4, head_dim=4, ffn_hidden_size=24, rms_norm_eps=1e-6, rope_theta=1e4,
                          max_position_embeddings=32, qkv_bias=qkv_bias, tie_word_embeddings=tied)


def random_state(arch, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g).to(dtype) for name, shape in hf_shapes(arch).items()}


def save_folder(folder, state, files: int = 1):
    """``files`` > 1: that many files and an index, like ``save_pretrained`` with a shard size."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    if files == 1:
        save_file(state, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for i in range(files):
        part = names[i::files]
        fname = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in part}, str(folder / fname))
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def partitioning(name: str):
    """(partition_dim, stride) as megatron's local spec sets them; None: replicated."""
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")) or name in ("embedding.word_embeddings.weight",
                                                                              "output_layer.weight"):
        return 0, 1
    if name.endswith("linear_fc1.weight"):
        return 0, 2
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1, 1
    return None


def fake_param(name, full, tp_rank, tp_world, dtype):
    part = partitioning(name)
    probe = torch.empty(0)
    if part is not None:
        probe.tensor_model_parallel, (probe.partition_dim, probe.partition_stride) = True, part
    local = tp_shard(full, probe, tp_rank, tp_world)
    param = torch.nn.Parameter(torch.full(local.shape, float("nan"), dtype=dtype))
    if part is not None:
        param.tensor_model_parallel, (param.partition_dim, param.partition_stride) = True, part
    return param, local


def test_row_layout_rebuilds_every_full_tensor():
    for tied in (False, True):
        arch = make_arch(tied=tied)
        state = random_state(arch)
        padded = padded_vocab_size(arch.vocab_size, 2)
        full = hf_to_megatron(state, arch, padded)
        for name in megatron_names(arch):
            rows = [state[src][s:e] if src is not None else state["model.embed_tokens.weight"].new_zeros(
                e - s, arch.hidden_size) for src, s, e in hf_row_layout(name, arch, padded)]
            assert torch.equal(torch.cat(rows), full[name]), name


@pytest.mark.parametrize("files", [1, 3], ids=["single-file", "indexed"])
@pytest.mark.parametrize("file_dtype,param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                    (torch.float32, torch.bfloat16)], ids=["f32", "bf16-file", "bf16-param"])
def test_sliced_reads_equal_sliced_full_tensors(tmp_path, files, file_dtype, param_dtype):
    for tied, divisible_by in ((False, 128), (True, 1)):
        arch = make_arch(tied=tied, qkv_bias=not tied)
        state = random_state(arch, file_dtype)
        reader = SafetensorsFolder(save_folder(tmp_path / f"tied{tied}", state, files))
        for tp_world in (1, 2, 4):
            padded = padded_vocab_size(arch.vocab_size, tp_world, divisible_by)
            full = hf_to_megatron(state, arch, padded)
            for tp_rank in range(tp_world):
                for name in megatron_names(arch):
                    param, local = fake_param(name, full[name], tp_rank, tp_world, param_dtype)
                    expected = torch.empty_like(param).copy_(local)
                    for chunk in (64, 1 << 20):  # 64 bytes: a row or two per read
                        param.data.fill_(float("nan"))
                        load_hf_param_slice(reader, name, param, arch, padded, tp_rank, tp_world,
                                            read_chunk_bytes=chunk)
                        assert torch.equal(param.data, expected), (name, tp_rank, tp_world, chunk)


def test_vocab_padding_straddles_a_rank(tmp_path):
    arch = make_arch(vocab=200)
    state = random_state(arch)
    reader = SafetensorsFolder(save_folder(tmp_path / "m", state))
    padded = padded_vocab_size(200, 4)  # 512: rank 1 holds rows 128..199 and 56 padding rows
    full = hf_to_megatron(state, arch, padded)
    param, local = fake_param("embedding.word_embeddings.weight", full["embedding.word_embeddings.weight"], 1, 4,
                              torch.float32)
    load_hf_param_slice(reader, "embedding.word_embeddings.weight", param, arch, padded, 1, 4)
    assert torch.equal(param.data, local)
    assert torch.equal(param.data[:72], state["model.embed_tokens.weight"][128:]) and not param.data[72:].any()


def test_missing_tensor_and_wrong_shape_name_the_tensor_and_file(tmp_path):
    arch = make_arch()
    state = random_state(arch)
    padded = padded_vocab_size(arch.vocab_size, 1)
    qkv = "decoder.layers.1.self_attention.linear_qkv.weight"
    full = hf_to_megatron(state, arch, padded)

    single = dict(state)
    del single["model.layers.1.self_attn.k_proj.weight"]
    reader = SafetensorsFolder(save_folder(tmp_path / "single", single))
    param, _ = fake_param(qkv, full[qkv], 0, 1, torch.float32)
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*files of .*single"):
        load_hf_param_slice(reader, qkv, param, arch, padded, 0, 1)

    folder = save_folder(tmp_path / "indexed", state, files=3)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    fname = index["weight_map"]["model.layers.1.self_attn.v_proj.weight"]
    index["weight_map"]["model.layers.1.self_attn.k_proj.weight"] = fname  # listed, but not in that file
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=rf"k_proj\.weight.*missing from .*{fname}"):
        load_hf_param_slice(SafetensorsFolder(folder), qkv, param, arch, padded, 0, 1)
    del index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"k_proj\.weight.*model\.safetensors\.index\.json does not list it"):
        load_hf_param_slice(SafetensorsFolder(folder), qkv, param, arch, padded, 0, 1)

    wrong = dict(state)
    wrong["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(32, 8)
    reader = SafetensorsFolder(save_folder(tmp_path / "wrong", wrong))
    with pytest.raises(ValueError, match=r"q_proj\.weight.* in .*wrong/model\.safetensors has shape \[32, 8\]; "
                                         r"the config implies \[32, 16\]"):
        load_hf_param_slice(reader, qkv, param, arch, padded, 0, 1)


def test_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        SafetensorsFolder(tmp_path)
