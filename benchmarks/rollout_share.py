"""Benchmark: sharing each rank's sampled groups with every rank, old vs new.

  old  ``dist.all_gather_object`` of whole ``Group`` objects (pickled token ids, log-probs,
       texts): what ``RolloutPhase._generate`` did
  new  ``RolloutPhase._share``: the groups packed into one flat int32 tensor per rank
       (``megatron_cegppo.rollout.exchange``), one all-gather of the sizes, one broadcast per
       non-empty buffer, unpacked and rebuilt as Groups on every rank (texts do not travel)

Every rank is a rollout leader with ``--completions`` completions (``--n`` per prompt) of about
``--tokens`` tokens each (uniform within +-25%), float32 log-probs and a text of 4 characters
per token. Each timing is the slowest rank's wall time, from a barrier to the Groups of every
rank in hand; median (and minimum) of ``--reps`` after one warmup. The run also checks that both give the
same token ids, log-probs, rewards, finish reasons and prompt indices on every rank.

Bytes: "sent" is what one rank contributes (old: its pickle; new: its int32 buffer); the old
path pads every rank's pickle to the largest and receives ``world x largest``.

Run from the repository root::

    .venv/bin/python benchmarks/rollout_share.py                      # 2 ranks x 256 x ~2000 tokens
    .venv/bin/python benchmarks/rollout_share.py --ranks 4 --tokens 500
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_cegppo.testing.multiprocess import run_distributed  # noqa: E402


def make_groups(rank, world, completions, n, tokens, seed=0):
    from megatron_cegppo.rollout.engine import Completion
    from megatron_cegppo.trainer.rollout_phase import Group

    g = torch.Generator().manual_seed(seed * 1000 + rank)
    prompts_here = completions // n
    groups = []
    for p in range(prompts_here):
        index = p * world + rank
        cs, texts = [], []
        for _ in range(n):
            length = int(torch.randint(int(tokens * 0.75), int(tokens * 1.25) + 1, (1,), generator=g))
            ids = torch.randint(0, 152_000, (length,), generator=g).tolist()
            lps = (-torch.rand(length, generator=g) * 10).tolist()
            text = bytes(torch.randint(97, 123, (4 * length,), generator=g, dtype=torch.uint8).tolist()).decode()
            cs.append(Completion(index, ids, lps, text, "length" if length > tokens else "stop"))
            texts.append(text)
        rewards = [float(i % 2) for i in range(n)]
        groups.append(Group(index, [1, 2, 3, index], cs, rewards, texts))
    return groups


def numbers(groups):
    return [(g.prompt_index, g.prompt_ids, g.rewards,
             [(c.prompt_index, c.token_ids, c.logprobs, c.finish_reason) for c in g.completions])
            for g in sorted(groups, key=lambda g: g.prompt_index)]


def slowest(seconds, device):
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def worker(rank, world, completions, n, tokens, reps):
    from megatron_cegppo.platform import current_platform
    from megatron_cegppo.rollout.exchange import SampledGroup, exchange_buffers, pack_groups, unpack_groups
    from megatron_cegppo.trainer.distributed import Layout
    from megatron_cegppo.trainer.rollout_phase import RolloutPhase

    device = current_platform().device
    groups = make_groups(rank, world, completions, n, tokens)
    prompts = [{"token_ids": [1, 2, 3, i], "answer": ""} for i in range((completions // n) * world)]
    layout = Layout(world=world, rank=rank, tp=1, pp=1, dp=world, tp_rank=0, pp_rank=0, dp_rank=rank,
                    dp_group=None, is_last_stage=True, rollout_tp=1, platform=current_platform())
    phase = RolloutPhase(None, layout, prompts, reward="", sampling=None, seed=0)

    def old():
        gathered = [None] * world
        dist.all_gather_object(gathered, groups)
        return [g for part in gathered for g in part]

    def new():
        return phase._share(groups, True)

    prepacked = pack_groups([SampledGroup(g.prompt_index, g.completions, g.rewards) for g in groups])

    def collectives():
        return exchange_buffers(prepacked, device=device)

    times = {"old": [], "new": [], "collectives": []}
    results = {}
    for i in range(reps + 1):
        for name, fn in (("old", old), ("new", new), ("collectives", collectives)):
            results.pop(name, None)  # the previous result is freed outside the timing
            dist.barrier()
            start = time.perf_counter()
            results[name] = fn()
            elapsed = slowest(time.perf_counter() - start, device)
            if i:
                times[name].append(elapsed)
    same = numbers(results["old"]) == numbers(results["new"])
    sampled = [SampledGroup(g.prompt_index, g.completions, g.rewards) for g in groups]
    start = time.perf_counter()
    packed = pack_groups(sampled)
    pack_s = time.perf_counter() - start
    start = time.perf_counter()
    unpack_groups(packed)
    unpack_s = time.perf_counter() - start
    buf = io.BytesIO()
    pickle.Pickler(buf).dump(groups)  # what all_gather_object sends
    return {
        "same": same, "old_s": times["old"], "new_s": times["new"], "collectives_s": times["collectives"],
        "old_bytes": len(buf.getvalue()), "new_bytes": packed.numel() * 4,
        "tokens": sum(len(c.token_ids) for g in groups for c in g.completions),
        "pack_s": pack_s, "unpack_s": unpack_s,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--completions", type=int, default=256, help="per rank")
    parser.add_argument("--n", type=int, default=8, help="completions per prompt")
    parser.add_argument("--tokens", type=int, default=2000, help="mean tokens per completion")
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args()
    start = time.perf_counter()
    ranks = run_distributed(worker, args.ranks, args.completions, args.n, args.tokens, args.reps, timeout=600)
    r0 = ranks[0]
    old, new = statistics.median(r0["old_s"]), statistics.median(r0["new_s"])
    old_bytes = max(r["old_bytes"] for r in ranks)
    new_bytes = max(r["new_bytes"] for r in ranks)
    tokens = sum(r["tokens"] for r in ranks)
    same = all(r["same"] for r in ranks)
    print(f"{args.ranks} ranks x {args.completions} completions x ~{args.tokens} tokens "
          f"({tokens:,} tokens in all), gloo, median of {args.reps}")
    print(f"old (all_gather_object of Groups): {old:8.3f} s (min {min(r0['old_s']):.3f})"
          f"   sent per rank {old_bytes / 2**20:8.1f} MiB"
          f"   received per rank {args.ranks * old_bytes / 2**20:8.1f} MiB")
    print(f"new (tensors)                    : {new:8.3f} s (min {min(r0['new_s']):.3f})"
          f"   sent per rank {new_bytes / 2**20:8.1f} MiB"
          f"   received per rank {sum(r['new_bytes'] for r in ranks) / 2**20:8.1f} MiB")
    print(f"new / old time: median {new / old:.3f} (old / new {old / new:.2f}x), "
          f"min {min(r0['new_s']) / min(r0['old_s']):.3f}; "
          f"bytes per rank new / old: {new_bytes / old_bytes:.3f}")
    print(f"new, collectives only (sizes + broadcasts of packed buffers): "
          f"{statistics.median(r0['collectives_s']):.3f} s (min {min(r0['collectives_s']):.3f})")
    print(f"of which pack {r0['pack_s']:.3f} s, unpack of one rank's buffer {r0['unpack_s']:.3f} s (rank 0)")
    print(f"same groups on every rank: {same}")
    print(f"total run time {time.perf_counter() - start:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ranks": ranks}, f, indent=1)
    if not same:
        raise SystemExit("old and new gave different groups")


if __name__ == "__main__":
    main()
