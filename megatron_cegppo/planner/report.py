"""The plan as a table: what each phase needs per GPU, and whether it fits."""

from __future__ import annotations

from megatron_cegppo.config.schema import RECOMPUTE_MODES
from megatron_cegppo.planner.plan import GIB, RESERVED_BYTES, Plan, total_parameters


_W = 58  # width of the label column


def _gib(b: int) -> str:
    return f"{b / GIB:.2f}"


def _header(title: str) -> str:
    return f"{title:<{_W}}{'GiB/GPU':>9}"


def _row(label: str, value: int, note: str = "") -> str:
    return f"  {label:<{_W - 2}}{value / GIB:9.2f}  {note}".rstrip()


def _verdict(used: int, capacity: int) -> str:
    verdict = "DOES NOT FIT" if used > capacity else "fits, tight" if used > 0.9 * capacity else "fits"
    return f"{verdict} ({100 * used / capacity:.0f}% of {capacity / GIB:.0f} GiB)"


def format_plan(plan: Plan, title: str = "") -> str:
    a, g, s = plan.arch, plan.generation, plan.training_stage
    dtype = "bf16" if s.params and s.grads // s.params == 2 else "fp32"
    lines = []
    if title:
        lines.append(f"plan: {title}")
    lines += [
        f"model: {a.model_type}, {total_parameters(a) / 1e9:.2f}B parameters, {a.num_layers} layers, "
        f"hidden {a.hidden_size}, heads {a.num_heads}/{a.num_kv_heads}, vocab {a.vocab_size}",
        f"cluster: {plan.nodes} node(s) x {plan.gpus_per_node} GPUs = {plan.world_size}, "
        f"{plan.gpu_memory / GIB:.1f} GiB each",
        f"training: TP {plan.tp} x PP {plan.pp}{f' (VPP {plan.vpp})' if plan.vpp else ''} x DP {plan.dp}, "
        f"sequence parallel {'on' if plan.sequence_parallel else 'off'}, recompute {plan.recompute}, "
        f"micro-batch {plan.micro_batch} x {plan.seq_len} tokens{' (packed)' if plan.packed else ''}, "
        f"{plan.num_microbatches} micro-batches per optimizer step"
        f"{f' (if every sequence is {plan.sequence_tokens} tokens)' if plan.packed else ''}, "
        f"log-probs {plan.logprob_impl}",
        f"generation: vLLM TP {plan.rollout_tp} ({max(1, plan.world_size // plan.rollout_tp)} engines), "
        f"gpu_memory_utilization {g.budget / plan.gpu_memory:.2f}, {g.sequences} sequences per engine per "
        f"round, max_model_len {g.max_model_len}",
    ]
    for problem in plan.problems:
        lines.append(f"LAYOUT PROBLEM: {problem}")
    lines += ["", _header(f"training phase, pipeline stage {s.stage} of {plan.pp} (the fullest)"),
              _row(f"parameters ({dtype})", s.params),
              _row("gradients (fp32)", s.grads),
              _row(f"optimizer state (fp32, split over DP {plan.dp})", s.optimizer)]
    for mode in RECOMPUTE_MODES:
        lines.append(_row(f"activations, recompute {mode}", s.activations[mode],
                          "<- chosen" if mode == plan.recompute else ""))
    lines.append(_row(f"output layer + log-probs/entropy ({plan.logprob_impl})", s.head))
    if s.reference:
        lines.append(_row("reference model (KL)", s.reference))
    lines += [_row("reserved (CUDA context, NCCL, allocator)", RESERVED_BYTES),
              _row("total", plan.training_total, _verdict(plan.training_total, plan.gpu_memory))]
    last = plan.stages[-1]
    if last is not s:
        lines.append(_row(f"last stage total (output layer + log-probs {_gib(last.head)})",
                          last.total(plan.recompute)))
    lines += [
              "", _header("generation phase (vLLM awake, training state resident)"),
              _row("training state (params, grads, optimizer)", plan.resident),
              _row(f"vLLM share (gpu_memory_utilization {g.budget / plan.gpu_memory:.2f})", g.budget),
              _row("  of which weights", g.weights),
              _row("  of which workspace (activations, CUDA graphs)", g.workspace),
              _row("  of which KV cache", g.kv_cache),
              _row("weight-sync buckets", 2 * plan.weight_bucket_bytes),
              _row("reserved (CUDA context, NCCL, allocator)", RESERVED_BYTES),
              _row("total", plan.generation_total, _verdict(plan.generation_total, plan.gpu_memory)),
              f"KV cache: {g.kv_tokens:,} tokens = {g.concurrent_sequences} sequence(s) of {g.max_model_len} tokens "
              f"at once per engine (all {g.sequences} at once would need {g.kv_needed_for_all / GIB:.1f} GiB)"]
    if g.concurrent_sequences < 1:
        lines.append("vLLM cannot hold one sequence of max_model_len: raise gpu_memory_utilization or rollout TP")
    lines += ["", f"verdict: {'fits' if plan.fits else 'DOES NOT FIT'}"]
    return "\n".join(lines)
