"""Benchmark: the training phase of one mini-batch, unpacked vs token-budget packed, CPU, TP2.

The trainer (``trainer.step_phases.pack_minibatches``) either cuts a mini-batch into ``micro_batch_size`` rows padded
to the step's longest sequence (unpacked) or packs whole sequences back to back into rows of
``algorithm.max_tokens_per_microbatch`` tokens with a block-diagonal causal mask (packed,
``attention="mask"``, megatron's local attention as on the CPU). For each length distribution
this runs, in 2 gloo processes at TP2 (DP1), both kinds of micro-batches through megatron's
schedule with the project's forward steps:

  * the old-log-prob recompute (``make_logprob_forward_step``, forward only, no grad), then
  * one forward+backward of the CE-GPPO loss (``make_policy_forward_step``, token-mean),

and reports, packed against unpacked measured in the same run:

  * computed tokens per real token (``MicroBatch.computed_tokens`` / ``real_tokens``);
  * wall time of that phase (recompute + forward/backward): the median over ``--repeats``
    repetitions after ``--warmup`` warm-up ones, the slower rank of each repetition;
  * peak memory per rank: the process's resident-set high-water mark (``VmHWM`` of
    ``/proc/self/status``) over the phase, reset before it by writing ``5`` to
    ``/proc/self/clear_refs`` after ``malloc_trim(0)``; the larger of the two ranks, as the
    peak and as the growth above the resident set at the phase start (the model, the
    micro-batches and the Python/torch runtime are in the latter's baseline).

Length distributions (prompt + response, label-aligned, as the model sees them):

  * ``lognormal``: 64 sequences, log-normal (median 24 tokens, sigma 1.2) capped at 384; the
    draw used (seed 3) has median 21 and longest 384 (18x); unpacked 8 sequences per
    micro-batch, packed budget 512 (the next power of two above the cap);
  * ``demo``: ``configs/tiny_cpu.yaml``'s own: 128 sequences per mini-batch (32 prompts x
    n=8 / 2 mini-batches), 6-token prompts ("37+45=" with the demo tokenizer), responses of
    up to ``rollout.max_tokens=8`` tokens; unpacked ``micro_batch_size=32`` (the demo's),
    packed budget 512.

Run from the repository root::

    .venv/bin/python benchmarks/packing_training.py --repeats 5
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TP = 2
VOCAB, PADDED_VOCAB = 2000, 2048
MODEL = dict(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=1024)
CEGPPO = dict(eps_low=0.2, eps_high=0.2, beta1=0.5, beta2=1.0, clip_ratio_c=10.0)  # configs/tiny_cpu.yaml


def lognormal_case(seed: int = 3):
    """64 sequences, median ~24 tokens, longest ~16x the median (cap 384), a 4-token prompt
    per group of 8 completions and responses of the rest of each sampled length."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.lognormal(np.log(24), 1.2, 64)), 5, 384).astype(int)
    return dict(name="lognormal", lengths=lengths.tolist(), prompt_len=4, group=8, micro_batch_size=8, budget=512)


def demo_case(seed: int = 0):
    """configs/tiny_cpu.yaml: 128 sequences, 6-token prompts, responses of 4..8 tokens
    (``\\boxed{`` + 1..3 digits + ``}`` + EOS, truncated at ``max_tokens=8``)."""
    rng = np.random.default_rng(seed)
    responses = rng.integers(4, 9, 128)
    return dict(name="demo", lengths=(6 + responses - 1).tolist(), prompt_len=6, group=8, micro_batch_size=32,
                budget=512)


CASES = {"lognormal": lognormal_case, "demo": demo_case}


def synthetic_rollout(case, seed: int = 1):
    """Prompts and completions whose model lengths (prompt + response - 1) are ``case["lengths"]``."""
    from megatron_cegppo.rollout.engine import Completion

    g = torch.Generator().manual_seed(seed)
    n, p, group = len(case["lengths"]), case["prompt_len"], case["group"]
    prompts = {k: torch.randint(0, VOCAB, (p,), generator=g).tolist() for k in range(-(-n // group))}
    completions = []
    for i, length in enumerate(case["lengths"]):
        r = length + 1 - p
        completions.append(Completion(i // group, torch.randint(0, VOCAB, (r,), generator=g).tolist(),
                                      (-4.0 + 0.3 * torch.randn(r, generator=g)).tolist()))
    advantages = torch.randn(n, generator=g)
    return prompts, completions, advantages


def microbatches(case, packed: bool):
    """This rank's micro-batches of the mini-batch, as ``trainer.step_phases.pack_minibatches`` builds them (DP1)."""
    from megatron_cegppo.algorithms.packing import pack_microbatches
    from megatron_cegppo.platform import current_platform
    from megatron_cegppo.rollout.batch import build_microbatches

    prompts, completions, advantages = synthetic_rollout(case)
    multiple = 8 * TP
    longest = max(case["lengths"])
    common = dict(pad_id=0, seq_len=-(-longest // multiple) * multiple, place=current_platform().place)
    if not packed:
        return build_microbatches(prompts, completions, advantages, micro_batch_size=case["micro_batch_size"],
                                  **common)
    mine = pack_microbatches(case["lengths"], max_tokens=case["budget"], dp_size=1)[0]
    return build_microbatches(prompts, completions, advantages, packs=mine,
                              packed_tokens=-(-case["budget"] // multiple) * multiple, attention="mask", **common)


def _schedule(model, forward_step, micro, forward_only=False):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rows, tokens = micro[0].input_ids.shape
    return get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro), model=model,
                                       num_microbatches=len(micro), seq_length=tokens, micro_batch_size=rows,
                                       forward_only=forward_only)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


_LIBC = ctypes.CDLL("libc.so.6")


def _reset_peak() -> int:
    """Returns freed heap to the OS, resets VmHWM to the current RSS; returns that RSS (KiB)."""
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def training_phase(model, micro, spec):
    """Recompute old log-probs (forward only), then one forward+backward of the policy loss."""
    from megatron_cegppo.parallel.pipeline_loss import (
        make_logprob_forward_step, make_policy_forward_step, minibatch_loss_normalizer,
    )

    with torch.no_grad():
        out = _schedule(model, make_logprob_forward_step(spec), micro, forward_only=True)
    for m, o in zip(micro, out):
        m.old_log_prob = o["log_prob"]
    norm = minibatch_loss_normalizer([m.loss_mask for m in micro], spec.loss_agg_mode, None)
    for m in micro:
        m.loss_normalizer = norm
    stores = _schedule(model, make_policy_forward_step(spec, num_microbatches=len(micro), dp_world_size=1), micro)
    return sum(float(s["loss"]) for s in stores)


def worker(rank, world, args):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.models import build_gpt_model_chunks
    from megatron_cegppo.cpu_compat import apply_cpu_compat
    from megatron_cegppo.parallel.pipeline_loss import PolicyLossSpec
    from megatron_cegppo.testing.tiny import tiny_gpt_config

    apply_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    config = tiny_gpt_config(TP, **MODEL)
    config.finalize_model_grads_func = finalize_model_grads
    cases = [CASES[c]() for c in args.cases]
    longest_row = max(max(max(c["lengths"]), c["budget"]) for c in cases)
    chunk = build_gpt_model_chunks(config, vocab_size=PADDED_VOCAB, max_sequence_length=-(-longest_row // 16) * 16)[0]
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), chunk)
    spec = PolicyLossSpec(loss="cegppo", loss_kwargs=CEGPPO, loss_agg_mode="token-mean", vocab_size=VOCAB,
                          logprob_impl="fused")
    results = {"params": sum(p.numel() for p in ddp.module.parameters()), "cases": {}}
    for case in cases:
        res = results["cases"][case["name"]] = {"case": case}
        for packed in (False, True):
            t0 = time.perf_counter()
            micro = microbatches(case, packed)
            build_s = time.perf_counter() - t0
            times, peaks, growths, losses = [], [], [], []
            for rep in range(args.warmup + args.repeats):
                ddp.zero_grad_buffer()
                dist.barrier()
                base = _reset_peak()
                t0 = time.perf_counter()
                losses.append(training_phase(ddp, micro, spec))
                elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                peak = _status_kib("VmHWM")
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step waits for the slower rank
                if rep >= args.warmup:
                    times.append(float(elapsed))
                    peaks.append(peak)
                    growths.append(peak - base)
                if rank == 0:
                    print(f"[{case['name']} {'packed' if packed else 'unpacked'}] rep {rep}: {float(elapsed):.2f} s"
                          f" peak {peak / 1024:.0f} MiB", flush=True)
            res["packed" if packed else "unpacked"] = dict(
                microbatches=len(micro), row_shape=tuple(micro[0].input_ids.shape),
                real=sum(m.real_tokens for m in micro), computed=sum(m.computed_tokens for m in micro),
                time_s=statistics.median(times), times=times, peak_kib=max(peaks), growth_kib=max(growths),
                build_s=build_s, loss=losses[-1])
            del micro
    return results


def _packed_computed_per_real(case) -> float:
    from megatron_cegppo.algorithms.packing import pack_microbatches

    mine = pack_microbatches(case["lengths"], max_tokens=case["budget"], dp_size=1)[0]
    return len(mine) * (-(-case["budget"] // (8 * TP)) * 8 * TP) / sum(case["lengths"])


def table(results, machine_note=""):
    lines = ["| distribution | path | micro-batches x [rows, tokens] | computed/real | phase time s (median) |"
             " peak RSS MiB/rank | RSS growth MiB/rank | build s |",
             "|---|---|---|---|---|---|---|---|"]
    summary = []
    for name, res in results["cases"].items():
        u, p = res["unpacked"], res["packed"]
        for label, r in (("unpacked", u), ("packed", p)):
            lines.append(
                f"| {name} | {label} | {r['microbatches']} x {list(r['row_shape'])} | {r['computed'] / r['real']:.3f} |"
                f" {r['time_s']:.2f} ({', '.join(f'{t:.2f}' for t in r['times'])}) | {r['peak_kib'] / 1024:.0f} |"
                f" {r['growth_kib'] / 1024:.0f} | {r['build_s']:.3f} |")
        lines.append(
            f"| {name} | **packed / unpacked** | | {p['computed'] / p['real'] / (u['computed'] / u['real']):.3f} |"
            f" {p['time_s'] / u['time_s']:.3f} (speed-up {u['time_s'] / p['time_s']:.2f}x) |"
            f" {p['peak_kib'] / u['peak_kib']:.3f} | {p['growth_kib'] / max(u['growth_kib'], 1):.3f} |"
            f" {p['build_s'] / u['build_s']:.2f} |")
        summary.append((name, p["computed"] / p["real"], u["time_s"] / p["time_s"], abs(p["loss"] - u["loss"])))
    return "\n".join(lines), summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args(argv)

    from megatron_cegppo.testing.multiprocess import run_distributed

    t0 = time.perf_counter()
    ranks = run_distributed(worker, TP, args, timeout=1200)
    total = time.perf_counter() - t0
    results = ranks[0]
    for r in ranks[1:]:  # memory: the larger rank
        for name, res in r["cases"].items():
            for path in ("unpacked", "packed"):
                for key in ("peak_kib", "growth_kib"):
                    results["cases"][name][path][key] = max(results["cases"][name][path][key], res[path][key])
    print(f"\nmodel: GPTModel {MODEL}, vocab {VOCAB} (padded {PADDED_VOCAB}), {results['params']} parameters per TP "
          f"rank, fp32; TP{TP} x 2 gloo processes, 1 thread each; CE-GPPO token-mean, fused log-probs")
    for name, res in results["cases"].items():
        c, lens = res["case"], res["case"]["lengths"]
        print(f"{name}: {len(lens)} sequences, median {statistics.median(lens):.0f}, max {max(lens)} "
              f"({max(lens) / statistics.median(lens):.1f}x median), {sum(lens)} real tokens; "
              f"unpacked micro_batch_size={c['micro_batch_size']}, packed max_tokens_per_microbatch={c['budget']}")
    text, summary = table(results)
    print(text)
    for name, cpr, speedup, dloss in summary:
        print(f"{name}: packed computed/real {cpr:.3f} (goal <= 1.1: {'met' if cpr <= 1.1 else 'NOT met'}), "
              f"speed-up {speedup:.2f}x, |loss packed - unpacked| {dloss:.2e}")
    spread = []
    for seed in range(10):  # the padding of other draws of the same distributions
        for make in CASES.values():
            c = make(seed)
            spread.append((c["name"], seed, _packed_computed_per_real(c)))
    for name in CASES:
        vals = [v for n, _, v in spread if n == name]
        print(f"{name}, seeds 0..9 (lengths only, no model): packed computed/real {min(vals):.3f}..{max(vals):.3f}")
    print(f"whole run {total:.0f} s")
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
