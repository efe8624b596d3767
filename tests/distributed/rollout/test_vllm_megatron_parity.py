"""vLLM engines colocated with Megatron (training TP=2) in real processes: after weights are
pushed from Megatron, vLLM's log-probs of its sampled tokens equal Megatron's recompute
(fp32, <= 1e-4), at rollout TP=1 and TP=2, with temperature != 1."""

from __future__ import annotations

import pytest
import torch

from megatron_cegppo.testing.multiprocess import run_distributed

pytestmark = pytest.mark.distributed

TEMPERATURE = 0.8


def save_tiny_qwen2(folder):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         num_hidden_layers=2, intermediate_size=256, vocab_size=100,
                         max_position_embeddings=64, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)


def worker(rank, world, folder, rollout_tp):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.models import build_gpt_from_hf, import_hf_weights, read_hf_config, read_hf_state
    from megatron_cegppo.cpu_compat import apply_cpu_compat
    from megatron_cegppo.parallel.pipeline_loss import PolicyLossSpec, make_logprob_forward_step
    from megatron_cegppo.rollout import EngineConfig, RolloutEngine, SamplingConfig
    from megatron_cegppo.rollout.batch import build_token_batch
    from megatron_cegppo.rollout.mismatch import logprob_mismatch
    from megatron_cegppo.rollout.weight_sync import push_megatron_weights

    apply_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    engine = RolloutEngine(folder, EngineConfig(tensor_parallel_size=rollout_tp, max_model_len=64,
                                                kv_cache_bytes=32 << 20), seed=0, skip_tokenizer_init=True)
    model_parallel_cuda_manual_seed(0)
    arch, config, chunks, padded = build_gpt_from_hf(read_hf_config(folder), tp=2, pp=1)
    import_hf_weights(chunks, read_hf_state(folder), arch, padded)

    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    sampling = SamplingConfig(n=2, temperature=TEMPERATURE, max_tokens=10)
    before = engine.generate(prompts, sampling, seeds=[11, 12, 13])
    # an "optimizer step": Megatron's weights move; vLLM must follow after the push
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    push_megatron_weights(engine, chunks, arch, bucket_bytes=128 << 10)
    after = engine.generate(prompts, sampling, seeds=[11, 12, 13])

    batch = build_token_batch(prompts, after, pad_id=0, seq_len=16)
    spec = PolicyLossSpec(temperature=TEMPERATURE, vocab_size=arch.vocab_size)
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=make_logprob_forward_step(spec), data_iterator=iter([batch]),
            model=chunks[0], num_microbatches=1, seq_length=16, micro_batch_size=len(after), forward_only=True)
    mismatch = logprob_mismatch(batch["rollout_log_prob"], out[0]["log_prob"], batch["loss_mask"])
    return dict(mismatch=mismatch, before=[c.token_ids for c in before], after=[c.token_ids for c in after],
                before_lp=[c.logprobs for c in before], after_lp=[c.logprobs for c in after])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    save_tiny_qwen2(path)
    return str(path)


@pytest.mark.parametrize("rollout_tp", [1, 2])
def test_vllm_logprobs_equal_megatron_after_weight_push(folder, rollout_tp):
    ranks = run_distributed(worker, 2, folder, rollout_tp, timeout=600)
    for r in ranks:
        assert r["mismatch"]["mismatch/abs_max"] <= 1e-4, r["mismatch"]
    assert ranks[0]["before_lp"] != ranks[0]["after_lp"], "the weight push changed nothing in vLLM"
    if rollout_tp == 2:  # one engine across both ranks: identical samples
        assert ranks[0]["after"] == ranks[1]["after"]
