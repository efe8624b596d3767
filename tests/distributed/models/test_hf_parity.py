"""Megatron GPTModels imported from HF Qwen2 / Llama folders (Llama also with Llama 3.x rope
scaling) compute HF transformers' logits (fp32, <= 1e-4) at TP1, TP2 and PP2, and exporting
them back gives every HF tensor exactly."""

from __future__ import annotations

import pytest
import torch

from megatron_cegppo.testing.multiprocess import run_distributed

pytestmark = pytest.mark.distributed

MODELS = [("qwen2", False, "default"), ("llama", False, "default"), ("qwen2", True, "default"),
          ("llama", False, "llama3")]
# Llama 3.x scaling changes the frequencies whose wavelength exceeds 8192 / 4 positions: a large
# theta puts some in each of its three regimes, and long sequences make the change visible
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def save_tiny_hf(folder, model_type, tied, rope_type="default"):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls_config, cls_model = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "llama": (LlamaConfig, LlamaForCausalLM)}[model_type]
    config = cls_config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        num_hidden_layers=4, intermediate_size=96, vocab_size=100, rms_norm_eps=1e-6,
                        max_position_embeddings=64, tie_word_embeddings=tied,
                        rope_parameters=LLAMA3_ROPE if rope_type == "llama3" else
                        {"rope_theta": 5000.0, "rope_type": "default"})
    torch.manual_seed(1)
    model = cls_model(config)
    with torch.no_grad():  # random biases/norms so that a mis-mapped tensor shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
            if rope_type == "llama3" and ("q_proj" in name or "k_proj" in name):
                p.mul_(20)  # sharp attention, so that the positions' rotation shows in the logits
    model.save_pretrained(folder)
    length = 60 if rope_type == "llama3" else 12
    tokens = torch.randint(0, 100, (2, length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(tokens).logits
    return tokens, logits, {k: v.clone() for k, v in model.state_dict().items()}


def worker(rank, world, folders, tp, pp):
    from megatron.core import parallel_state

    from megatron_cegppo.models import build_gpt_from_hf, export_hf_weights, import_hf_weights, read_hf_config, read_hf_state
    from megatron_cegppo.cpu_compat import apply_cpu_compat
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron_cegppo.testing.logits import forward_logits

    apply_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(0)
    out = {}
    for key, (folder, tokens) in folders.items():
        hf_config = read_hf_config(folder)
        arch, config, chunks, padded = build_gpt_from_hf(hf_config, tp=tp, pp=pp)
        import_hf_weights(chunks, read_hf_state(folder), arch, padded)
        logits = forward_logits(chunks[0], tokens, arch.vocab_size)
        exported = dict(export_hf_weights(chunks, arch, bucket_bytes=64 << 10))
        out[key] = (logits, exported if rank == 0 else None)
    return out


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    made = {}
    for model_type, tied, rope_type in MODELS:
        folder = tmp_path_factory.mktemp(f"{model_type}{'_tied' if tied else ''}_{rope_type}")
        made[(model_type, tied, rope_type)] = (str(folder), *save_tiny_hf(folder, model_type, tied, rope_type))
    return made


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_megatron_logits_equal_hf_and_export_is_exact(hf_models, tp, pp):
    folders = {key: (folder, tokens) for key, (folder, tokens, _, _) in hf_models.items()}
    ranks = run_distributed(worker, tp * pp, folders, tp, pp, timeout=300)
    for key, (_, _, hf_logits, hf_state) in hf_models.items():
        got = [r[key][0] for r in ranks if r[key][0] is not None]
        assert got, "no rank returned logits"
        for logits in got:
            err = (logits - hf_logits).abs().max().item()
            assert err <= 1e-4, f"{key} at TP{tp} PP{pp}: logits differ from HF by {err:.3g}"
        exported = ranks[0][key][1]
        expected = {k: v for k, v in hf_state.items() if not (key[1] and k == "lm_head.weight")}
        assert set(exported) == set(expected), set(exported) ^ set(expected)
        for name, tensor in expected.items():
            assert torch.equal(exported[name], tensor), f"{key}: {name} differs after export"
