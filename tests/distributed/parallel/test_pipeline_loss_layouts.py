"""The CE-GPPO loss through megatron-core's pipeline schedules on a tiny GPTModel (RoPE, GQA,
SwiGLU, RMSNorm, QKV bias) in real processes: TP=2, PP=2, TP2xPP2, interleaved PP and
sequence parallel give the loss and every parameter gradient of the TP1/PP1 run of the same
weights, and the TP1/PP1 run equals a plain dense autograd computation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_cegppo.models.sharding import global_named_parameters as global_named_params
from megatron_cegppo.models.sharding import tp_shard
from megatron_cegppo.testing.multiprocess import run_distributed
from megatron_cegppo.testing.synthetic_batch import random_rollout, rollout_microbatch
from megatron_cegppo.testing.tiny import tiny_gpt_config

pytestmark = pytest.mark.distributed

PADDED_VOCAB, VOCAB, SEQ, MICRO, NUM_MICRO = 128, 100, 16, 2, 4
LOSS_KWARGS = dict(eps_low=0.2, eps_high=0.2, beta1=0.5, beta2=1.0, clip_ratio_c=3.0)


def make_batches():
    g = torch.Generator().manual_seed(7)
    batches = []
    for m in range(NUM_MICRO):
        ids, mask = random_rollout(g, rows=MICRO, seq=SEQ, vocab=VOCAB, start=(2, 8), min_response=0)
        if m == 1:
            mask[0] = 0  # a sequence without response tokens
        adv = torch.randn(MICRO, 1, generator=g).expand(MICRO, SEQ).clone()
        adv[adv.abs() < 0.2] = 0.0
        batches.append(rollout_microbatch(
            ids, mask, adv,
            # a near-uniform random model gives log-probs ~ -log(100): ratios spread over both clips
            old_log_prob=-4.6 + 0.3 * torch.randn(MICRO, SEQ, generator=g),
            ref_log_prob=-4.6 + 0.3 * torch.randn(MICRO, SEQ, generator=g),
        ))
        # the correct responses, for the positive-sample NLL term (micro-batch 2 has none)
        batches[-1]["positive"] = torch.tensor([m != 2 and r == m % 2 for r in range(MICRO)])
    return batches


def _setup(tp, pp, vpp, sp, share, batch_p2p=False):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.models import build_gpt_model_chunks
    from megatron_cegppo.cpu_compat import apply_cpu_compat
    from megatron_cegppo.platform import current_platform

    apply_cpu_compat()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    config = tiny_gpt_config(tp, pp, vpp, sp)
    if batch_p2p:  # asked of the platform, as every config is: silently wrong on gloo if granted
        config.batch_p2p_comm = current_platform().batch_p2p_comm
    chunks = build_gpt_model_chunks(
        config, vocab_size=PADDED_VOCAB, max_sequence_length=SEQ,
        share_embeddings_and_output_weights=share,
    )
    return config, chunks


def _train_step(config, chunks, impl, loss_name, agg, kl_coeff=0.0, positive_coeff=0.0):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_cegppo.parallel.pipeline_loss import (
        PolicyLossSpec, make_policy_forward_step, minibatch_loss_normalizer, positive_loss_normalizer,
    )

    ddp = [
        DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), c)
        for c in chunks
    ]
    config.finalize_model_grads_func = finalize_model_grads
    batches = make_batches()
    norm = minibatch_loss_normalizer([b["loss_mask"] for b in batches], agg)
    positive = positive_loss_normalizer(batches, agg)
    for b in batches:
        b["loss_normalizer"], b["positive_normalizer"] = norm, positive
    kwargs = LOSS_KWARGS if loss_name == "cegppo" else {}
    spec = PolicyLossSpec(loss=loss_name, loss_kwargs=kwargs, loss_agg_mode=agg, kl_coeff=kl_coeff,
                          positive_loss_coeff=positive_coeff, vocab_size=VOCAB, logprob_impl=impl)
    stores = get_forward_backward_func()(
        forward_step_func=make_policy_forward_step(spec, num_microbatches=NUM_MICRO),
        data_iterator=[iter(batches) for _ in ddp] if len(ddp) > 1 else iter(batches),
        model=ddp if len(ddp) > 1 else ddp[0], num_microbatches=NUM_MICRO,
        seq_length=SEQ, micro_batch_size=MICRO,
    )
    grads = {name: p.main_grad.detach().clone() for name, p in global_named_params(chunks)}
    for d in ddp:
        d.zero_grad_buffer()
    return [dict(s) for s in stores], grads


RUNS = [("logits", "cegppo", "token-mean"), ("fused", "cegppo", "token-mean"),
        ("logits", "cegppo", "token-mean", 0.1),  # with a reference-model KL (k3) term
        ("logits", "cegppo", "seq-mean-token-mean"), ("fused", "gspo", "seq-mean-token-mean"),
        # with the positive-sample NLL term (the authors' recipe: 0.1)
        ("logits", "cegppo", "token-mean", 0.0, 0.1), ("logits", "cegppo", "seq-mean-token-sum-norm", 0.0, 0.1)]


def reference_worker(rank, world, share):
    """TP1/PP1: the full weights, the schedule's results, and a dense autograd check."""
    from megatron_cegppo.losses import POLICY_LOSSES
    from megatron_cegppo.parallel.pipeline_loss import set_output_hidden_states

    config, (model,) = _setup(1, 1, None, False, share)
    with torch.no_grad():
        # padded rows, as an HF import leaves them
        head = model.embedding.word_embeddings if share else model.output_layer
        head.weight[VOCAB:] = 0.0
    state = {name: p.detach().clone() for name, p in global_named_params([model])}
    results = {run: _train_step(config, [model], *run) for run in RUNS}

    # Dense: full-vocabulary log_softmax over the whole mini-batch at once, plain autograd.
    dense = {}
    for run in RUNS:
        impl, loss_name, agg, kl, positive_coeff = (*run, 0.0, 0.0)[:5]
        if impl != "logits":
            continue
        set_output_hidden_states(model, False)
        batches = make_batches()
        cat = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        logits = model(cat["input_ids"], cat["position_ids"], None)  # [b, s, V]
        logp = torch.log_softmax(logits[..., :VOCAB].double(), dim=-1)
        lp = logp.gather(-1, cat["labels"].unsqueeze(-1)).squeeze(-1)
        kwargs = LOSS_KWARGS if loss_name == "cegppo" else {}
        loss, _ = POLICY_LOSSES[loss_name](lp, cat["old_log_prob"].double(), cat["advantages"].double(),
                                           cat["loss_mask"], loss_agg_mode=agg, **kwargs)
        mask = cat["loss_mask"].bool()
        if kl:  # k3 written out: exp(ref - lp) - (ref - lp) - 1, mean over response tokens
            d = cat["ref_log_prob"].double() - lp
            loss = loss + kl * ((torch.exp(d) - d - 1)[mask]).mean()
        if positive_coeff:  # the NLL of the correct responses' tokens, as a batch of their own
            correct = cat["positive"]
            nll = -(lp[correct][mask[correct]]).sum()
            if agg == "token-mean":
                nll = nll / mask[correct].sum()
            else:  # seq-mean-token-sum-norm: their number x length
                nll = nll / (correct.sum() * SEQ)
            loss = loss + positive_coeff * nll
        loss.backward()
        # the DDP wrapper of _train_step moves .grad into main_grad (zeroed after each step)
        grads = {n: p.main_grad.clone() for n, p in global_named_params([model])}
        for _, p in global_named_params([model]):
            p.main_grad.zero_()
        dense[run] = (loss.item(), grads)
    return state, results, dense


def layout_worker(rank, world, layout, state, share):
    from megatron.core import parallel_state

    config, chunks = _setup(layout["tp"], layout["pp"], layout.get("vpp"), layout.get("sp", False), share,
                            layout.get("batch_p2p", False))
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, param in global_named_params(chunks):
            param.copy_(tp_shard(state[name], param, tp_rank, layout["tp"]))
    out = {}
    for run in RUNS:
        stores, grads = _train_step(config, chunks, *run)
        meta = {n: (getattr(p, "tensor_model_parallel", False) and p.partition_dim, p.partition_stride
                    if getattr(p, "tensor_model_parallel", False) else 1)
                for n, p in global_named_params(chunks)}
        out[run] = (stores, grads, meta)
    return dict(tp_rank=tp_rank, tp=layout["tp"], last=parallel_state.is_pipeline_last_stage(), runs=out)


_REFERENCES: dict = {}


def reference(share: bool):
    """The TP1/PP1 run, once per module for each embedding variant."""
    if share not in _REFERENCES:
        _REFERENCES[share] = run_distributed(reference_worker, 1, share, timeout=300)[0]
    return _REFERENCES[share]


def _losses(stores):
    return [float(s["loss"]) for s in stores]


@pytest.mark.parametrize("share", [False, True], ids=["untied", "tied"])
def test_reference_schedule_equals_dense_autograd(share):
    state, results, dense = reference(share)
    assert len(dense) == 5
    for run, (stores, grads) in results.items():
        if run not in dense:
            continue
        loss, dense_grads = dense[run]
        assert sum(_losses(stores)) == pytest.approx(loss, abs=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(g, dense_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    # the fused path on the same weights gives the same numbers as the logits path
    logits_run, fused_run = results[RUNS[0]], results[RUNS[1]]
    assert _losses(fused_run[0]) == pytest.approx(_losses(logits_run[0]), abs=1e-6)
    for name in logits_run[1]:
        torch.testing.assert_close(fused_run[1][name], logits_run[1][name], atol=1e-6, rtol=1e-5, msg=name)


LAYOUTS = {
    "tp2": dict(tp=2, pp=1),
    "pp2": dict(tp=1, pp=2),
    "tp2pp2": dict(tp=2, pp=2),
    "pp2-interleaved": dict(tp=1, pp=2, vpp=2),
    "pp2-interleaved-batch-p2p-requested": dict(tp=1, pp=2, vpp=2, batch_p2p=True),
    "tp2-sequence-parallel": dict(tp=2, pp=1, sp=True),
}


# Tied embeddings matter where the embedding and the output layer sit on different stages.
CASES = [(name, False) for name in LAYOUTS] + [("tp2pp2", True), ("pp2-interleaved", True)]


@pytest.mark.parametrize("layout_name,share", CASES, ids=[f"{n}-{'tied' if t else 'untied'}" for n, t in CASES])
def test_layout_matches_tp1_pp1(layout_name, share):
    state, ref_results, _ = reference(share)
    layout = LAYOUTS[layout_name]
    world = layout["tp"] * layout["pp"]
    ranks = run_distributed(layout_worker, world, layout, state, share, timeout=300)
    for run in RUNS:
        ref_stores, ref_grads = ref_results[run]
        last = [r for r in ranks if r["last"]]
        assert last, "no rank reported being the last pipeline stage"
        for r in last:  # every TP rank of the last stage reports the same losses
            got = _losses(r["runs"][run][0])
            assert got == pytest.approx(_losses(ref_stores), abs=1e-5), f"{run}: {got}"
            ref_metrics = ref_stores[0]
            for key in ("clipfrac_low", "clipfrac_high", "entropy", "approx_kl"):
                assert float(r["runs"][run][0][0][key]) == pytest.approx(float(ref_metrics[key]), abs=1e-5), key
        seen = set()
        for r in ranks:
            stores, grads, meta = r["runs"][run]
            for name, g in grads.items():
                dim, stride = meta[name]
                layout_of = SimpleNamespace(tensor_model_parallel=dim is not False, partition_dim=dim,
                                            partition_stride=stride)
                ref = tp_shard(ref_grads[name], layout_of, r["tp_rank"], r["tp"])
                torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4,
                                           msg=lambda m, n=name: f"{layout_name} {run} {n}: {m}")
                seen.add(name)
        assert seen == set(ref_grads), f"parameters not covered: {set(ref_grads) - seen}"
