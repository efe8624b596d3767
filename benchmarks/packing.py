"""Benchmark: token-budget micro-batch packing (``megatron_cegppo.algorithms.packing``).

For each length distribution x data-parallel size x token budget it prints, on 1024 sequences:

  * ours: ``pack_microbatches`` — balance (largest deviation of a rank's real-token total from
    the mean, %), fill (real tokens / (micro-batches x budget), %), micro-batches per rank
    (min-max), computed tokens per real token if every micro-batch is padded to the budget
    (= 1 / fill; 1.0 with unpadded THD packing), and time per call (median of ``--repeats``);
  * alt: first-fit-decreasing over the whole step, then the micro-batches dealt to ranks by
    greedy LPT on their totals (the alternative the module docstring argues against);
  * baseline: today's trainer — each rank takes a contiguous slice of the step's sequences,
    ``--micro-batch-size`` sequences per micro-batch, every row padded to the longest sequence
    of the step (rounded up to a multiple of 8): computed tokens per real token, and the
    per-rank real-token balance. It has no token budget (a micro-batch holds
    micro_batch_size x padded length tokens), so its numbers repeat across budgets.

Balance and fill are for seed 0, with the worst over ``--seeds`` seeds alongside.

Run from the repository root::

    .venv/bin/python benchmarks/packing.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from megatron_cegppo.algorithms.packing import pack_microbatches, packing_stats
from megatron_cegppo.testing.lengths import DISTRIBUTIONS


def global_ffd_then_lpt(lengths, max_tokens, dp_size):
    lens = [int(n) for n in lengths]
    bins, room = [], []
    for i in sorted(range(len(lens)), key=lambda i: (-lens[i], i)):
        for b, free in enumerate(room):
            if lens[i] <= free:
                bins[b].append(i)
                room[b] -= lens[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lens[i])
    packs, totals = [[] for _ in range(dp_size)], [0] * dp_size
    for b in sorted(range(len(bins)), key=lambda b: (room[b], b)):
        r = min(range(dp_size), key=lambda r: (totals[r], r))
        packs[r].append(bins[b])
        totals[r] += max_tokens - room[b]
    return packs


def baseline(lengths, dp_size, micro_batch_size):
    """Today's trainer: contiguous rank slices, fixed-size micro-batches padded to the longest."""
    lens = np.asarray(lengths)
    seq_len = -(-int(lens.max()) // 8) * 8
    per_rank = len(lens) // dp_size
    rank_tokens = [int(lens[r * per_rank:(r + 1) * per_rank].sum()) for r in range(dp_size)]
    mean = statistics.mean(rank_tokens)
    return {
        "max_dev_pct": max(abs(t - mean) for t in rank_tokens) / mean * 100.0,
        "computed_per_real": per_rank * dp_size * seq_len / lens[:per_rank * dp_size].sum(),
        "microbatches_per_rank": -(-per_rank // micro_batch_size),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--dp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--budgets", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    args = ap.parse_args()

    print(f"n={args.n} sequences; seed 0 (worst over seeds 0..{args.seeds - 1}); "
          f"baseline micro_batch_size={args.micro_batch_size}\n")
    print("| distribution | DP | budget | ours dev % | ours fill % | ours mb/rank | ours computed/real "
          "| ours ms/call | alt dev % | alt fill % | alt mb/rank | baseline dev % | baseline computed/real "
          "| baseline mb/rank |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, dist in DISTRIBUTIONS.items():
        samples = [dist(np.random.default_rng(s), n=args.n) for s in range(args.seeds)]
        for dp in args.dp:
            for budget in args.budgets:
                ours, alts = [], []
                for lengths in samples:
                    ours.append(packing_stats(lengths, pack_microbatches(lengths, max_tokens=budget, dp_size=dp), budget))
                    alts.append(packing_stats(lengths, global_ffd_then_lpt(lengths, budget, dp), budget))
                as_list = samples[0].tolist()
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    pack_microbatches(as_list, max_tokens=budget, dp_size=dp)
                    times.append(time.perf_counter() - t0)
                base = [baseline(lengths, dp, args.micro_batch_size) for lengths in samples]

                def mb(s):
                    c = s["microbatches_per_rank"]
                    return f"{min(c)}" if min(c) == max(c) else f"{min(c)}-{max(c)}"

                def pair(vals, fmt, worst):
                    return f"{fmt.format(vals[0])} ({fmt.format(worst(vals))})"

                print(f"| {name} | {dp} | {budget} "
                      f"| {pair([s['max_dev_pct'] for s in ours], '{:.3f}', max)} "
                      f"| {pair([100 * s['mean_fill'] for s in ours], '{:.1f}', min)} "
                      f"| {mb(ours[0])} "
                      f"| {pair([1 / s['mean_fill'] for s in ours], '{:.3f}', max)} "
                      f"| {1e3 * statistics.median(times):.2f} "
                      f"| {pair([s['max_dev_pct'] for s in alts], '{:.2f}', max)} "
                      f"| {pair([100 * s['mean_fill'] for s in alts], '{:.1f}', min)} "
                      f"| {mb(alts[0])} "
                      f"| {pair([b['max_dev_pct'] for b in base], '{:.2f}', max)} "
                      f"| {pair([b['computed_per_real'] for b in base], '{:.2f}', max)} "
                      f"| {base[0]['microbatches_per_rank']} |")


if __name__ == "__main__":
    main()
