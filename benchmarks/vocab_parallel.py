"""Benchmark: per-token log-probs and entropy over a tensor-parallel vocabulary shard.

Three ways of computing ``(log_prob, entropy)`` with gradients, same inputs, same loss:

  (a) common          megatron's ``vocab_parallel_cross_entropy`` (on a copy of the logits:
                      it overwrites its input) for the log-probs, plus the entropy from a
                      separate softmax that autograd keeps (all-reduced across shards at TP>1)
  (b) ours (logits)   ``megatron_cegppo.parallel.vocab_parallel_logprobs_entropy``
  (c) ours (fused)    ``megatron_cegppo.parallel.fused_vocab_parallel_logprobs_entropy``
                      (from the hidden states and the output weight; never forms the logits)

End to end, every variant starts from ``hidden [T, H]`` and this rank's output-weight shard
``[V/TP, H]`` (both requiring grad; (a) and (b) form ``logits = hidden @ weight.T``), takes
``loss = (log_prob * w1 + entropy * w2).sum()`` and runs backward to hidden and weight. A
second pair of rows times (a) and (b) from a leaf ``logits`` tensor, to isolate the
log-prob/entropy part.

Every (variant, TP) measurement runs in fresh processes (one per TP rank), so that the peak
memory of one variant cannot leak into another's:

  * CPU: baseline = RSS after the inputs are built; peak extra = ``ru_maxrss`` after the
    warmup and timed iterations minus the baseline. Large CPU tensors are mmap'd by glibc and
    returned to the OS when freed, so RSS follows the live tensors; the workers get a fixed
    ``MALLOC_MMAP_THRESHOLD_`` (1 MiB) so that glibc does not raise its threshold after
    frees and start keeping freed tensors of a few MiB in its heap, which would count
    memory that is no longer live.
  * CUDA: ``max_memory_allocated`` minus the allocated bytes after the inputs are built.

Run from the repository root::

    .venv/bin/python benchmarks/vocab_parallel.py                       # T=4096 H=1024 V=32768, TP 1 and 2
    .venv/bin/python benchmarks/vocab_parallel.py --tokens 512 --tp 1   # a quick look
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import queue as queue_mod
import statistics
import sys
import time
import traceback
import warnings

# The package is importable from the checkout without installing it.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

MiB = float(1 << 20)

# glibc: allocations of at least this many bytes are mmap'd (and unmapped when freed). Fixed,
# it also turns off glibc's dynamic threshold, which otherwise rises up to 32 MiB after the
# first frees. Set for the worker processes only (read by glibc at process start).
MALLOC_MMAP_THRESHOLD = 1 << 20

VARIANTS = {
    "a": "(a) common",
    "b": "(b) ours (logits)",
    "c": "(c) ours (fused)",
}

# (variant, start): what each measurement begins from. "hidden" is the end-to-end comparison.
CASES = [
    ("a", "hidden"),
    ("b", "hidden"),
    ("c", "hidden"),
    ("a", "logits"),
    ("b", "logits"),
]

# Targets, end to end (from hidden), relative to (a): (max memory ratio, max time ratio).
TARGETS = {"b": (0.5, 1.0), "c": (0.2, 1.5)}

# Agreement of (b) and (c) with (a): max abs difference of log-probs and entropy, and max abs
# difference of the gradients relative to the largest gradient of (a).
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}


# --------------------------------------------------------------------------------------------
# Worker side (one process per tensor-parallel rank; nothing GPU-specific is imported before
# the device is known).


def _setup(rank: int, world: int, port: int, threads: int):
    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*Apex.*")
    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
    )
    from megatron_cegppo.cpu_compat import apply_cpu_compat

    apply_cpu_compat()
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    group = parallel_state.get_tensor_model_parallel_group()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    return device, group


def _teardown():
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _make_inputs(cfg: dict, rank: int, world: int, device, start: str):
    """Inputs of one rank. hidden, labels, w1 and w2 are the same on every rank; the weight
    shard [V/TP, H] is drawn per rank. Generated in place (no temporaries that would raise
    ru_maxrss before the baseline is taken)."""
    import torch

    dtype = getattr(torch, cfg["dtype"])
    T, H, V = cfg["tokens"], cfg["hidden"], cfg["vocab"]
    width = V // world
    g = torch.Generator().manual_seed(cfg["seed"])
    hidden = torch.randn(T, H, generator=g)
    labels = torch.randint(0, V, (T,), generator=g)
    w1 = torch.randn(T, generator=g)
    w2 = torch.randn(T, generator=g)
    gw = torch.Generator().manual_seed(cfg["seed"] + 1 + rank)
    weight = torch.randn(width, H, generator=gw).mul_(cfg["logit_scale"] / H**0.5)
    hidden = hidden.to(device=device, dtype=dtype)
    weight = weight.to(device=device, dtype=dtype)
    labels, w1, w2 = labels.to(device), w1.to(device), w2.to(device)
    inputs = dict(labels=labels, w1=w1, w2=w2)
    if start == "logits":
        with torch.no_grad():
            logits = hidden @ weight.t()
        del hidden, weight
        inputs["logits"] = logits.requires_grad_(True)
    else:
        inputs["hidden"] = hidden.requires_grad_(True)
        inputs["weight"] = weight.requires_grad_(True)
    return inputs


def _common_logprobs_entropy(logits, labels, group, world):
    """(a): megatron's vocab-parallel cross entropy + an entropy from an autograd softmax."""
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    # megatron-core 0.16 takes the tensor-parallel group from parallel_state (no group
    # argument); it subtracts the max in place, hence the copy.
    log_probs = -vocab_parallel_cross_entropy(logits.clone(), labels)
    x = logits.float()  # no-op in fp32; megatron's cross entropy upcasts the same way
    if world == 1:
        p = torch.softmax(x, dim=-1)
        entropy = torch.logsumexp(x, dim=-1) - (p * x).sum(-1)
    else:
        # The same across shards. Every replicated quantity is a function of all-reduced
        # local sums only: the backward of megatron's reduce_from_tensor_model_parallel_region
        # is the identity, which is right for a sum of per-shard terms but would drop the
        # other shards' share of d/d lse in ``sum(exp(x - lse) * x)`` (lse is global). Hence
        #   H = lse - sum_all(e * x) / sum_all(e),  e = exp(x - m),  m the detached global max.
        m = x.detach().amax(dim=-1)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(x - m.unsqueeze(-1))
        sum_exp = reduce_from_tensor_model_parallel_region(e.sum(-1), group)
        sum_ex = reduce_from_tensor_model_parallel_region((e * x).sum(-1), group)
        lse = m + torch.log(sum_exp)
        entropy = lse - sum_ex / sum_exp
    return log_probs, entropy


def _forward(variant: str, start: str, inputs: dict, group, world: int):
    from megatron_cegppo.parallel import (
        fused_vocab_parallel_logprobs_entropy,
        vocab_parallel_logprobs_entropy,
    )

    labels = inputs["labels"]
    if variant == "c":
        return fused_vocab_parallel_logprobs_entropy(
            inputs["hidden"], inputs["weight"], labels, tp_group=group
        )
    if start == "logits":
        logits = inputs["logits"]
    else:
        hidden = inputs["hidden"]
        if world > 1:
            # As megatron's ColumnParallelLinear: identity forward, gradient of the replicated
            # hidden states summed over the group in backward ((c) does the same internally).
            from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

            hidden = copy_to_tensor_model_parallel_region(hidden, group)
        logits = hidden @ inputs["weight"].t()
    if variant == "a":
        return _common_logprobs_entropy(logits, labels, group, world)
    return vocab_parallel_logprobs_entropy(logits, labels, tp_group=group)


def _leaves(inputs: dict):
    return [t for k, t in inputs.items() if k in ("hidden", "weight", "logits")]


def _step(variant, start, inputs, group, world):
    """One forward + backward; the gradients are dropped afterwards (each iteration
    allocates them afresh, as a training step that consumes them would)."""
    log_probs, entropy = _forward(variant, start, inputs, group, world)
    loss = (log_probs * inputs["w1"] + entropy * inputs["w2"]).sum()
    loss.backward()
    for t in _leaves(inputs):
        t.grad = None


def _sync(device):
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def _measure(rank, world, cfg, variant, start):
    import resource

    import psutil
    import torch

    device, group = _setup(rank, world, cfg["port"], cfg["threads"])
    try:
        inputs = _make_inputs(cfg, rank, world, device, start)
        gc.collect()
        cuda = device.type == "cuda"
        proc = psutil.Process()
        if cuda:
            torch.cuda.synchronize(device)
            baseline = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            baseline = proc.memory_info().rss
            maxrss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        times = []
        for i in range(cfg["warmup"] + cfg["reps"]):
            _sync(device)
            t0 = time.perf_counter()
            _step(variant, start, inputs, group, world)
            _sync(device)
            if i >= cfg["warmup"]:
                times.append(time.perf_counter() - t0)
        out = dict(rank=rank, times=times, baseline_bytes=baseline)
        if cuda:
            out["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - baseline
            out["peak_valid"] = True
        else:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            gc.collect()
            out["peak_extra_bytes"] = maxrss - baseline
            # If the run never rose above the setup's high-water mark, maxrss says nothing
            # about the run: flag it rather than report a wrong number.
            out["peak_valid"] = maxrss > maxrss_setup
            out["setup_maxrss_above_baseline_bytes"] = maxrss_setup - baseline
            out["rss_after_minus_baseline_bytes"] = proc.memory_info().rss - baseline
        return out
    finally:
        _teardown()


def _check(rank, world, cfg):
    """(b) and (c) against (a), from the same hidden/weight: max abs differences of
    log-probs, entropy, and max abs gradient differences relative to max |grad of (a)|."""
    import torch
    import torch.distributed as dist

    device, group = _setup(rank, world, cfg["port"], cfg["threads"])
    try:
        inputs = _make_inputs(cfg, rank, world, device, "hidden")
        results = {}
        for variant in ("a", "b", "c"):
            lp, ent = _forward(variant, "hidden", inputs, group, world)
            loss = (lp * inputs["w1"] + ent * inputs["w2"]).sum()
            loss.backward()
            results[variant] = dict(
                lp=lp.detach().float(),
                ent=ent.detach().float(),
                gh=inputs["hidden"].grad.float(),
                gw=inputs["weight"].grad.float(),
            )
            inputs["hidden"].grad = inputs["weight"].grad = None
            del lp, ent, loss
        ref = results["a"]
        diffs = {}
        for variant in ("b", "c"):
            r = results[variant]
            vals = torch.stack([
                (r["lp"] - ref["lp"]).abs().max(),
                (r["ent"] - ref["ent"]).abs().max(),
                (r["gh"] - ref["gh"]).abs().max() / ref["gh"].abs().max(),
                (r["gw"] - ref["gw"]).abs().max() / ref["gw"].abs().max(),
            ]).to(device)
            dist.all_reduce(vals, op=dist.ReduceOp.MAX, group=group)
            diffs[variant] = dict(zip(
                ("log_prob_max_abs", "entropy_max_abs", "grad_hidden_max_rel", "grad_weight_max_rel"),
                (float(v) for v in vals.cpu()),
            ))
        diffs["entropy_mean"] = float(ref["ent"].mean())
        return diffs
    finally:
        _teardown()


def _worker(fn_name, rank, world, cfg, args, results):
    try:
        fn = {"measure": _measure, "check": _check}[fn_name]
        results.put((rank, True, fn(rank, world, cfg, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent, whatever it is
        results.put((rank, False, traceback.format_exc()))


# --------------------------------------------------------------------------------------------
# Parent side.


def _run_ranks(fn_name, world, cfg, *args, timeout=3600.0):
    """Runs ``fn_name`` on ``world`` fresh spawned processes; returns results in rank order."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    from megatron_cegppo.testing.multiprocess import free_port

    cfg = dict(cfg, port=free_port())
    # Inherited by the spawned interpreters; left as the user set it if already set.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MALLOC_MMAP_THRESHOLD))
    procs = [
        ctx.Process(target=_worker, args=(fn_name, r, world, cfg, args, results))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    outcomes = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world:
            try:
                rank, ok, payload = results.get(timeout=5.0)
                outcomes[rank] = (ok, payload)
            except queue_mod.Empty:
                dead = [p for r, p in enumerate(procs)
                        if r not in outcomes and not p.is_alive()]
                if dead:
                    codes = [p.exitcode for p in dead]
                    raise RuntimeError(f"{fn_name}: worker(s) exited without a result: {codes}"
                                       " (killed for memory?)")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn_name}: no result within {timeout:.0f} s")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    failed = {r: v for r, (ok, v) in outcomes.items() if not ok}
    if failed:
        raise RuntimeError("\n".join(f"rank {r}:\n{tb}" for r, tb in sorted(failed.items())))
    return [outcomes[r][1] for r in range(world)]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _device_kind() -> tuple[str, int]:
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.device_count()
    return "cpu", 0


def _machine(device: str) -> dict:
    import torch

    info = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        platform=platform.platform(),
        cores=_cores(),
        device=device,
    )
    try:
        from importlib.metadata import version

        info["megatron_core"] = version("megatron-core")
    except Exception:  # noqa: BLE001
        info["megatron_core"] = "unknown"
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / (1 << 30), 1)
    except Exception:  # noqa: BLE001
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt_mib(b: float) -> str:
    return f"{b / MiB:,.0f}"


def _table(rows: list[dict], copy_bytes: dict) -> str:
    head = ("| TP | variant | from | time s (median) | time × (a) | peak extra MiB "
            "| mem × (a) | ≈ [T,V/TP] fp32 copies |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['tp']} | {VARIANTS[r['variant']]} | {r['start']} | {r['time_s']:.3f} "
            f"| {r['time_ratio']:.2f} | {_fmt_mib(r['peak_extra_bytes'])}"
            f"{'' if r['peak_valid'] else ' (?)'} | {r['mem_ratio']:.2f} "
            f"| {r['peak_extra_bytes'] / copy_bytes[r['tp']]:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--tp", default="1,2", help="comma-separated tensor-parallel sizes")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--json", default=None, help="write the raw numbers here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logit-scale", type=float, default=3.0,
                        help="standard deviation of the logits (default 3)")
    args = parser.parse_args(argv)

    tps = [int(x) for x in args.tp.split(",") if x.strip()]
    device, n_gpus = _device_kind()
    cores = _cores()
    machine = _machine(device)
    print(f"# vocab-parallel log-probs + entropy: T={args.tokens} H={args.hidden} "
          f"V={args.vocab} dtype={args.dtype} reps={args.reps} warmup={args.warmup} "
          f"device={device} cores={cores}", flush=True)
    for k in ("cpu_model", "gpu", "torch", "megatron_core"):
        if k in machine:
            print(f"#   {k}: {machine[k]}", flush=True)

    base_cfg = dict(tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype,
                    reps=args.reps, warmup=args.warmup, seed=args.seed,
                    logit_scale=args.logit_scale)
    all_rows, checks, copy_bytes, skipped = [], {}, {}, []
    t_start = time.perf_counter()
    for tp in tps:
        if args.vocab % tp:
            print(f"[tp={tp}] skipped: vocab {args.vocab} is not divisible by {tp}", flush=True)
            skipped.append(tp)
            continue
        if device == "cuda" and n_gpus < tp:
            print(f"[tp={tp}] skipped: needs {tp} GPUs, {n_gpus} visible", flush=True)
            skipped.append(tp)
            continue
        cfg = dict(base_cfg, threads=max(1, cores // tp) if device == "cpu" else 1)
        copy_bytes[tp] = args.tokens * (args.vocab // tp) * 4
        print(f"[tp={tp}] torch threads per rank: {cfg['threads']}; one [T, V/TP] fp32 tensor "
              f"= {_fmt_mib(copy_bytes[tp])} MiB", flush=True)

        t0 = time.perf_counter()
        diffs = _run_ranks("check", tp, cfg)[0]
        tol = TOLERANCE[args.dtype]
        ok = all(diffs[v][k] < tol for v in ("b", "c") for k in diffs[v])
        diffs["agree"] = ok
        diffs["tolerance"] = tol
        checks[tp] = diffs
        for v in ("b", "c"):
            d = diffs[v]
            print(f"[tp={tp}] check {VARIANTS[v]} vs (a): max|Δ log_prob| {d['log_prob_max_abs']:.2e}, "
                  f"max|Δ entropy| {d['entropy_max_abs']:.2e}, grad hidden rel "
                  f"{d['grad_hidden_max_rel']:.2e}, grad weight rel {d['grad_weight_max_rel']:.2e}",
                  flush=True)
        print(f"[tp={tp}] results agree (all < {tol:g}): {'yes' if ok else 'NO'}  "
              f"(mean entropy {diffs['entropy_mean']:.3f} nats; {time.perf_counter() - t0:.0f} s)",
              flush=True)

        rows = []
        for variant, start in CASES:
            t0 = time.perf_counter()
            per_rank = _run_ranks("measure", tp, cfg, variant, start)
            times = per_rank[0]["times"]  # barriers around each step: every rank sees the same
            row = dict(
                tp=tp, variant=variant, name=VARIANTS[variant], start=start,
                time_s=statistics.median(times), times_s=times,
                peak_extra_bytes=max(r["peak_extra_bytes"] for r in per_rank),
                peak_valid=all(r["peak_valid"] for r in per_rank),
                per_rank=per_rank,
            )
            rows.append(row)
            print(f"[tp={tp}] {VARIANTS[variant]:<18} from {start:<6}: "
                  f"{row['time_s']:.3f} s (median of {len(times)}), peak extra "
                  f"{_fmt_mib(row['peak_extra_bytes'])} MiB "
                  f"({row['peak_extra_bytes'] / copy_bytes[tp]:.1f} x [T,V/TP] fp32)"
                  f"{'' if row['peak_valid'] else ' [peak not above setup high-water mark]'}"
                  f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
        for row in rows:
            ref = next(r for r in rows if r["variant"] == "a" and r["start"] == row["start"])
            row["time_ratio"] = row["time_s"] / ref["time_s"]
            row["mem_ratio"] = row["peak_extra_bytes"] / max(1, ref["peak_extra_bytes"])
        all_rows.extend(rows)

    total = time.perf_counter() - t_start
    print()
    print(_table(all_rows, copy_bytes))
    print()
    verdicts = []
    for tp in sorted({r["tp"] for r in all_rows}):
        for variant, (mem_max, time_max) in TARGETS.items():
            row = next(r for r in all_rows
                       if r["tp"] == tp and r["variant"] == variant and r["start"] == "hidden")
            for what, value, limit in (("memory", row["mem_ratio"], mem_max),
                                       ("time", row["time_ratio"], time_max)):
                passed = value <= limit
                verdicts.append(dict(tp=tp, variant=variant, what=what, ratio=value,
                                     limit=limit, passed=passed))
                print(f"target TP={tp} {VARIANTS[variant]} {what}: {value:.2f} x (a) "
                      f"<= {limit} x : {'PASS' if passed else 'FAIL'}")
    for tp, d in checks.items():
        print(f"agreement TP={tp}: {'PASS' if d['agree'] else 'FAIL'} "
              f"(log-prob/entropy max abs diff and gradient max rel diff < {d['tolerance']:g})")
    print(f"total {total:.0f} s")

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(
                config=dict(base_cfg, tp=tps, skipped_tp=skipped),
                machine=machine,
                command=" ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:]),
                malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                one_logits_copy_bytes={str(k): v for k, v in copy_bytes.items()},
                checks={str(k): v for k, v in checks.items()},
                rows=all_rows,
                targets=verdicts,
                total_seconds=total,
            ), f, indent=1)
        print(f"raw numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
