"""Weight sync streams the model in buckets of bounded size: at TP2 x PP2 every bucket holds at
most ``bucket_bytes`` (or a single larger tensor), and the buckets together are exactly the
HF state the model was imported from."""

from __future__ import annotations

import pytest

from megatron_cegppo.testing.multiprocess import run_distributed

pytestmark = pytest.mark.distributed

BUCKET = 24 << 10  # a few tensors of the tiny model per bucket; its embedding is larger


def hf_config():
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       num_hidden_layers=4, intermediate_size=96, vocab_size=100, max_position_embeddings=64)


def megatron_parameter(hf_name: str) -> str:
    """HF tensors that come from one megatron parameter (fused QKV, fused gate/up) share a key."""
    for part, fused in (("q_proj", "qkv"), ("k_proj", "qkv"), ("v_proj", "qkv"), ("gate_proj", "fc1"), ("up_proj", "fc1")):
        hf_name = hf_name.replace(part, fused)
    return hf_name.rsplit(".", 1)[0] + ("" if hf_name.endswith("weight") else ".bias")


def worker(rank, world, state):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.models import build_gpt_from_hf, import_hf_weights
    from megatron_cegppo.models.hf_io import hf_weight_buckets
    from megatron_cegppo.cpu_compat import apply_cpu_compat

    apply_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    model_parallel_cuda_manual_seed(0)
    arch, _, chunks, padded = build_gpt_from_hf(hf_config(), tp=2, pp=2)
    import_hf_weights(chunks, state, arch, padded)
    buckets = [[(name, t.clone()) for name, t in b] for b in hf_weight_buckets(chunks, arch, bucket_bytes=BUCKET)]
    return buckets if rank == 0 else len(buckets)


def test_buckets_are_bounded_and_complete():
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    state = {k: v.clone() for k, v in Qwen2ForCausalLM(hf_config()).state_dict().items()}
    results = run_distributed(worker, 4, state, timeout=180)
    buckets = results[0]
    assert all(n == len(buckets) for n in results[1:])  # every rank streams in step
    assert len(buckets) > 3
    for bucket in buckets:
        nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
        assert nbytes <= BUCKET or len({megatron_parameter(name) for name, _ in bucket}) == 1, \
            [name for name, _ in bucket]
    exported = {name: t for bucket in buckets for name, t in bucket}
    assert sum(len(b) for b in buckets) == len(exported) == len(state)
    for name, tensor in state.items():
        assert torch.equal(exported[name], tensor), name
