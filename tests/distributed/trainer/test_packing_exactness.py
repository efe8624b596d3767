"""Packing changes speed, never results: the trainer's packed micro-batches (sequences back to
back in rows of a token budget, balanced over data-parallel ranks) and its unpacked ones (rows
padded to the longest) give the same old log-probs, losses and parameter gradients, in real
processes at TP2, PP2, TP2xPP2, interleaved PP, sequence parallelism and DP2, for every policy
loss and aggregation mode, with the KL and entropy terms and truncated importance sampling."""

from __future__ import annotations

import pytest
import torch

from megatron_cegppo.testing.multiprocess import run_distributed
from megatron_cegppo.testing.tiny import tiny_gpt_config

pytestmark = pytest.mark.distributed

PADDED_VOCAB, VOCAB, SEQUENCES, BUDGET = 128, 100, 16, 48
LOSSES = ("cegppo", "ppo", "cispo", "gspo")
AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KWARGS = {"cegppo": dict(eps_low=0.2, eps_high=0.2, beta1=0.5, beta2=1.0, clip_ratio_c=3.0),
          "ppo": dict(eps_low=0.2, eps_high=0.28, clip_ratio_c=3.0), "cispo": dict(eps_high=0.28), "gspo": {}}
RUNS = [(loss, agg, {}) for loss in LOSSES for agg in AGGS] + [
    ("cegppo", "token-mean", dict(kl_coeff=0.1, entropy_coeff=0.01, tis_cap=2.0))]


def _rollout():
    """Prompts and completions of varied lengths (long-tailed: a few long, most short)."""
    from megatron_cegppo.rollout.engine import Completion

    g = torch.Generator().manual_seed(3)
    prompts = {i: torch.randint(0, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for i in range(4)}
    completions = []
    for k in range(SEQUENCES):
        n = int(torch.randint(1, 6, (1,), generator=g)) if k % 5 else int(torch.randint(10, 20, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        completions.append(Completion(k % 4, ids, (-4.6 + 0.3 * torch.randn(n, generator=g)).tolist()))
    advantages = torch.randn(SEQUENCES, generator=g)
    advantages[advantages.abs() < 0.2] = 0.0
    # per-completion offsets for the old/reference log-probs: ratios spread over both clips
    shifts = 0.3 * torch.randn(SEQUENCES, 2, generator=g)
    return prompts, completions, advantages, shifts


def _microbatches(packed: bool, tp: int, dp: int, dp_rank: int, pp: int = 1, vpp=None):
    from megatron_cegppo.algorithms.packing import pack_microbatches, split_to_multiple
    from megatron_cegppo.platform import current_platform
    from megatron_cegppo.rollout.batch import build_microbatches

    prompts, completions, advantages, shifts = _rollout()
    longest = max(len(prompts[c.prompt_index]) + len(c.token_ids) - 1 for c in completions)
    seq_len = -(-longest // (8 * tp)) * 8 * tp
    place = current_platform().place
    if not packed:
        per = SEQUENCES // dp
        rows = list(range(dp_rank * per, (dp_rank + 1) * per))
        micro = build_microbatches(prompts, [completions[i] for i in rows], advantages[rows], pad_id=0,
                                   seq_len=seq_len, place=place, micro_batch_size=per // 2)
    else:
        lengths = [len(prompts[c.prompt_index]) + len(c.token_ids) - 1 for c in completions]
        mine = pack_microbatches(lengths, max_tokens=BUDGET, dp_size=dp)[dp_rank]
        if vpp:  # megatron's interleaved schedule: a multiple of PP micro-batches
            mine = split_to_multiple(mine, lengths, pp)
        rows = sorted(i for p in mine for i in p)
        where = {i: k for k, i in enumerate(rows)}
        micro = build_microbatches(prompts, [completions[i] for i in rows], advantages[rows], pad_id=0,
                                   seq_len=seq_len, place=place, packs=[[where[i] for i in p] for p in mine],
                                   packed_tokens=-(-BUDGET // (8 * tp)) * 8 * tp, attention="mask")
        return micro, [list(p) for p in mine], shifts  # the completion of each loss row
    per = len(rows) // len(micro)
    return micro, [rows[j * per:(j + 1) * per] for j in range(len(micro))], shifts


def _schedule(ddp, forward_step, micro, forward_only=False):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rows, tokens = micro[0].input_ids.shape
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[iter(micro) for _ in ddp] if len(ddp) > 1 else iter(micro),
        model=ddp if len(ddp) > 1 else ddp[0], num_microbatches=len(micro), seq_length=tokens,
        micro_batch_size=rows, forward_only=forward_only)


def worker(rank, world, layout):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.models import build_gpt_model_chunks
    from megatron_cegppo.cpu_compat import apply_cpu_compat
    from megatron_cegppo.parallel.pipeline_loss import (
        PolicyLossSpec, make_logprob_forward_step, make_policy_forward_step, minibatch_loss_normalizer,
    )
    from megatron_cegppo.rollout.mismatch import truncated_importance_weights

    tp, pp, vpp, sp = layout["tp"], layout.get("pp", 1), layout.get("vpp"), layout.get("sp", False)
    apply_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    config = tiny_gpt_config(tp, pp, vpp, sp)
    config.finalize_model_grads_func = finalize_model_grads
    chunks = build_gpt_model_chunks(config, vocab_size=PADDED_VOCAB, max_sequence_length=64)
    ddp = [DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), c) for c in chunks]
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    dp_group = parallel_state.get_data_parallel_group()
    last = parallel_state.is_pipeline_last_stage()
    out = {"old": {}, "runs": {}}
    for packed in (False, True):
        micro, order, shifts = _microbatches(packed, tp, dp, dp_rank, pp, vpp)
        spec = PolicyLossSpec(loss="cegppo", vocab_size=VOCAB)
        with torch.no_grad():
            old = _schedule(ddp, make_logprob_forward_step(spec), micro, forward_only=True)
        if last:  # per completion: its response positions' old log-probs
            for m, o, rows in zip(micro, old, order):
                for r, k in enumerate(rows):
                    out["old"].setdefault(k, {})[packed] = o["log_prob"][r][m.loss_mask[r].bool()].clone()
        for run in RUNS:
            loss_name, agg, extra = run
            for m, o, rows in zip(micro, old or [None] * len(micro), order):
                base = o["log_prob"] if o is not None else torch.zeros_like(m.loss_mask)
                m.old_log_prob = base - shifts[rows, :1]
                m.ref_log_prob = base - shifts[rows, 1:]
            norm = minibatch_loss_normalizer([m.loss_mask for m in micro], agg, dp_group)
            weighted = []
            for m in micro:
                m.loss_normalizer = norm
                adv = m.advantages
                if extra.get("tis_cap") is not None:
                    adv = adv * truncated_importance_weights(m.old_log_prob, m.rollout_log_prob, extra["tis_cap"])
                weighted.append(adv)
            saved = [m.advantages for m in micro]
            for m, adv in zip(micro, weighted):
                m.advantages = adv
            spec = PolicyLossSpec(loss=loss_name, loss_kwargs=KWARGS[loss_name], loss_agg_mode=agg, vocab_size=VOCAB,
                                  kl_coeff=extra.get("kl_coeff", 0.0), entropy_coeff=extra.get("entropy_coeff", 0.0))
            stores = _schedule(ddp, make_policy_forward_step(spec, num_microbatches=len(micro), dp_world_size=dp),
                               micro)
            for m, adv in zip(micro, saved):
                m.advantages = adv
            loss = torch.tensor(sum(float(s["loss"]) for s in stores) if stores else 0.0, dtype=torch.float64)
            torch.distributed.all_reduce(loss, group=dp_group)
            grads = {f"{i}.{n}": p.main_grad.detach().clone() for i, d in enumerate(ddp)
                     for n, p in d.module.named_parameters()}
            for d in ddp:
                d.zero_grad_buffer()
            out["runs"].setdefault(f"{loss_name}/{agg}/{sorted(extra)}", {})[packed] = (float(loss), grads)
        out.setdefault("computed", {})[packed] = sum(m.computed_tokens for m in micro)
        out.setdefault("real", {})[packed] = sum(m.real_tokens for m in micro)
    out["last"] = last
    return out


LAYOUTS = {
    "tp2": dict(tp=2),
    "pp2": dict(tp=1, pp=2),
    "tp2pp2": dict(tp=2, pp=2),
    "pp2-interleaved": dict(tp=1, pp=2, vpp=2),
    "tp2-sequence-parallel": dict(tp=2, sp=True),
    "dp2": dict(tp=1),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_packed_equals_unpacked(name):
    layout = LAYOUTS[name]
    world = layout["tp"] * layout.get("pp", 1) * (2 if name == "dp2" else 1)
    ranks = run_distributed(worker, world, layout, timeout=600)
    for r in ranks:
        for key, by_path in r["runs"].items():
            (loss_u, grads_u), (loss_p, grads_p) = by_path[False], by_path[True]
            assert loss_p == pytest.approx(loss_u, abs=1e-5, rel=1e-5), f"{name} {key}: loss {loss_p} vs {loss_u}"
            assert any(g.abs().max() > 0 for g in grads_u.values()), f"{name} {key}: no gradient at all"
            for param, g in grads_u.items():
                torch.testing.assert_close(grads_p[param], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name} {key} {param}: {m}")
    old = {}  # completion -> path -> its old log-probs (DP2: the paths may put it on other ranks)
    for r in ranks:
        if r["last"]:
            for k, by_path in r["old"].items():
                old.setdefault(k, {}).update(by_path)
    assert sorted(old) == list(range(SEQUENCES)) and all(len(v) == 2 for v in old.values())
    for k, by_path in old.items():
        torch.testing.assert_close(by_path[True], by_path[False], atol=1e-6, rtol=0, msg=lambda m: f"{name} {k}: {m}")
    # padding waste, as the metrics report it: the packed rows compute fewer tokens
    computed = {p: sum(r["computed"][p] for r in ranks) for p in (False, True)}
    real = {p: sum(r["real"][p] for r in ranks) for p in (False, True)}
    assert real[True] == real[False]
    assert computed[True] < computed[False]
