"""Activation recomputation changes memory, not results: at TP2 and TP2xPP2 the policy loss
and every parameter gradient with ``recompute=selective`` and ``recompute=full`` equal those
without recomputation, also with dropout on (the recomputed forward replays the CPU generator
and megatron's RNG tracker, through the CPU shim of ``tensor_parallel.random``)."""

from __future__ import annotations

import pytest
import torch

from megatron_cegppo.testing.multiprocess import run_distributed

pytestmark = pytest.mark.distributed

MODES = ("none", "selective", "full")
VOCAB, SEQ, MBS, MICRO, LAYERS = 100, 16, 2, 2, 4


def hf_config():
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       num_hidden_layers=LAYERS, intermediate_size=96, vocab_size=VOCAB,
                       max_position_embeddings=64, rms_norm_eps=1e-6)


def microbatches():
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(MICRO):
        ids = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
        mask = (torch.arange(SEQ) >= 4).float().expand(MBS, SEQ).contiguous()
        out.append(dict(
            input_ids=ids[:, :-1], labels=ids[:, 1:], position_ids=torch.arange(SEQ).expand(MBS, SEQ),
            loss_mask=mask, old_log_prob=-4.6 + 0.3 * torch.randn(MBS, SEQ, generator=g),
            advantages=torch.randn(MBS, 1, generator=g).expand(MBS, SEQ).contiguous(),
        ))
    return out


def worker(rank, world, tp, pp, dropout):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.models import build_gpt_from_hf
    from megatron_cegppo.cpu_compat import apply_cpu_compat
    from megatron_cegppo.parallel.pipeline_loss import (
        PolicyLossSpec, make_policy_forward_step, minibatch_loss_normalizer,
    )

    apply_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    calls = [0]
    upstream_checkpoint = tensor_parallel.checkpoint

    def counting_checkpoint(*args, **kwargs):  # shows that recomputation is really in use
        calls[0] += 1
        return upstream_checkpoint(*args, **kwargs)

    tensor_parallel.checkpoint = counting_checkpoint
    spec = PolicyLossSpec(loss="cegppo", loss_kwargs=dict(eps_low=0.2, eps_high=0.2, beta1=0.5, beta2=1.0,
                                                          clip_ratio_c=10.0),
                          vocab_size=VOCAB, logprob_impl="fused")
    micro = microbatches()
    norm = minibatch_loss_normalizer([m["loss_mask"] for m in micro], spec.loss_agg_mode)
    for m in micro:
        m["loss_normalizer"] = norm
    out = {}
    for mode in MODES:
        model_parallel_cuda_manual_seed(0)
        torch.manual_seed(0)
        _, _, (chunk,), _ = build_gpt_from_hf(hf_config(), tp=tp, pp=pp, recompute=mode, vocab_divisible_by=8,
                                               hidden_dropout=dropout, attention_dropout=dropout)
        model_parallel_cuda_manual_seed(1)
        torch.manual_seed(1)
        calls[0] = 0
        stores = get_forward_backward_func()(
            forward_step_func=make_policy_forward_step(spec, num_microbatches=MICRO), data_iterator=iter(micro),
            model=chunk, num_microbatches=MICRO, seq_length=SEQ, micro_batch_size=MBS,
        )
        losses = [s["loss"] for s in stores] if stores else []
        grads = {n: p.grad.clone() for n, p in chunk.named_parameters()}
        out[mode] = (losses, grads, calls[0])
    return out


@pytest.mark.parametrize("tp,pp,dropout", [(2, 1, 0.0), (2, 1, 0.2), (2, 2, 0.0)],
                         ids=["tp2", "tp2-dropout", "tp2xpp2"])
def test_recompute_gives_the_same_loss_and_gradients(tp, pp, dropout):
    for rank, out in enumerate(run_distributed(worker, tp * pp, tp, pp, dropout, timeout=300)):
        losses, grads, calls = out["none"]
        assert calls == 0
        assert all(g.abs().sum() > 0 for g in grads.values()), "a gradient is zero: a vacuous comparison"
        for mode in ("selective", "full"):
            got_losses, got_grads, got_calls = out[mode]
            # one checkpointed unit per layer of this stage and micro-batch (attention or layer)
            assert got_calls == MICRO * LAYERS // pp, (mode, got_calls)
            assert len(got_losses) == len(losses)
            for a, b in zip(got_losses, losses):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
            assert set(got_grads) == set(grads)
            for name, g in grads.items():
                torch.testing.assert_close(got_grads[name], g, atol=1e-6, rtol=0,
                                           msg=lambda m, n=name: f"rank {rank} {mode} {n}: {m}")
