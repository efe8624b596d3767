"""CE-GPPO updates of a tiny GPTModel at a chosen TP x PP layout, on synthetic rollouts.

Started by torchrun (``--nproc-per-node = tp * pp``). Each update is one megatron pipeline
forward/backward whose last stage computes vocab-parallel log-probs and entropy and the
CE-GPPO loss; the table shows how the clip fractions and the four token quadrants move as
the policy leaves the rollout policy over several epochs.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from megatron_cegppo.platform import init_platform, init_process_group

VOCAB, PADDED_VOCAB, PROMPT, RESPONSE = 100, 128, 8, 24


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--logprob-impl", choices=["logits", "fused"], default="fused")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--minibatches", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=2, help="per mini-batch")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    return p.parse_args()


def synthetic_rollouts(n_micro, micro, generator):
    """Prompt + sampled response token ids (responses of 4 to RESPONSE tokens after the
    prompt), GRPO advantages of random 0/1 rewards (groups of 4)."""
    from megatron_cegppo.algorithms.advantages import grpo_advantages
    from megatron_cegppo.testing.synthetic_batch import random_rollout, rollout_microbatch

    out = []
    for _ in range(n_micro):
        ids, mask = random_rollout(generator, rows=micro, seq=PROMPT + RESPONSE, vocab=VOCAB, start=PROMPT - 1,
                                   min_response=4, max_end=PROMPT - 1 + RESPONSE)
        reward = torch.randint(0, 2, (micro,), generator=generator).float()
        out.append(rollout_microbatch(ids, mask, grpo_advantages(reward, 4)))
    return out


def main() -> None:
    args = parse_args()
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.config.schema import AlgorithmConfig
    from megatron_cegppo.losses import loss_kwargs
    from megatron_cegppo.models import build_gpt_model_chunks
    from megatron_cegppo.parallel.pipeline_loss import (
        PolicyLossSpec, make_logprob_forward_step, make_policy_forward_step,
        minibatch_loss_normalizer, reduce_microbatch_metrics,
    )
    from megatron_cegppo.testing.tiny import tiny_gpt_config

    platform = init_platform(args.device)
    init_process_group(platform)
    parallel_state.initialize_model_parallel(args.tp, args.pp)
    model_parallel_cuda_manual_seed(args.seed)
    torch.manual_seed(args.seed)
    config = tiny_gpt_config(args.tp, args.pp)
    config.finalize_model_grads_func = finalize_model_grads
    chunks = build_gpt_model_chunks(config, vocab_size=PADDED_VOCAB, max_sequence_length=PROMPT + RESPONSE)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), chunks[0])
    schedule = get_forward_backward_func()
    reporter = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0

    # the run config's defaults: the paper's CE-GPPO settings
    spec = PolicyLossSpec(loss="cegppo", loss_kwargs=loss_kwargs("cegppo", AlgorithmConfig()), vocab_size=VOCAB,
                          logprob_impl=args.logprob_impl)
    n_micro = args.minibatches * args.microbatches
    # built on the CPU (the same on every rank), then placed where the model is
    data = platform.place(synthetic_rollouts(n_micro, args.micro_batch_size, torch.Generator().manual_seed(args.seed)))
    common = dict(model=model, num_microbatches=n_micro, seq_length=PROMPT + RESPONSE,
                  micro_batch_size=args.micro_batch_size)

    # Rollout-policy log-probs: a forward-only pass; the last stage holds them, and it is the
    # only stage that reads them.
    with torch.no_grad():
        old = schedule(forward_step_func=make_logprob_forward_step(spec), data_iterator=iter(data),
                       forward_only=True, **common)
    for mb, out in zip(data, old or [{}] * n_micro):
        mb["old_log_prob"] = out.get("log_prob", torch.zeros_like(mb["loss_mask"]))

    if reporter:
        print(f"CE-GPPO at TP={args.tp} x PP={args.pp} ({args.logprob_impl} log-probs), "
              f"{n_micro} micro-batches of {args.micro_batch_size}")
        print(f"{'update':>6} {'loss':>9} {'clip lo':>8} {'clip hi':>8} {'dual':>6} {'entropy':>8} "
              f"{'kl(k3)':>8} {'PA&HP':>6} {'PA&LP':>6} {'NA&HP':>6} {'NA&LP':>6}")
    update = 0
    for _ in range(args.epochs):
        for m in range(args.minibatches):
            batch = data[m * args.microbatches:(m + 1) * args.microbatches]
            norm = minibatch_loss_normalizer([b["loss_mask"] for b in batch], spec.loss_agg_mode)
            for b in batch:
                b["loss_normalizer"] = norm
            stores = schedule(forward_step_func=make_policy_forward_step(spec, num_microbatches=len(batch)),
                              data_iterator=iter(batch), **{**common, "num_microbatches": len(batch)})
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(p.main_grad, alpha=-args.lr)
            model.zero_grad_buffer()
            update += 1
            if reporter:
                r = reduce_microbatch_metrics(stores)
                q = [r[f"quadrant/{k}_frac"] for k in ("pa_hp", "pa_lp", "na_hp", "na_lp")]
                print(f"{update:>6} {r['loss']:>9.5f} {r['clipfrac_low']:>8.3f} {r['clipfrac_high']:>8.3f} "
                      f"{r['dualclip_frac']:>6.3f} {r['entropy']:>8.4f} {r['approx_kl_k3']:>8.5f} "
                      + " ".join(f"{x:>6.3f}" for x in q), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
