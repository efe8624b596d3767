"""Smoke check of the GPU path: one process, one device, a few minutes.

  1. train    one optimizer step per policy loss (cegppo, ppo, cispo, gspo) of a tiny
              Qwen2-shaped megatron-core GPTModel in bf16, with megatron's DDP
              (``grad_reduce_in_fp32``) and distributed optimizer (fp32 master weights),
              through ``get_forward_backward_func`` and the project's pipeline loss, on
              synthetic rollouts: the loss, the gradients and the gradient norm are finite
              and the step moves the weights.
  2. parity   ``vocab_parallel_logprobs_entropy`` and ``fused_vocab_parallel_logprobs_entropy``
              on the device, fp32 and bf16 inputs, against a float64 dense ``log_softmax``
              on the CPU: log-probs, entropy and gradients.
  3. timing   forward + backward of the log-prob/entropy implementations at one TP rank's
              shard of a 152064-token vocabulary at TP8 (tokens 16384, hidden 5120, vocab
              shard 19008, bf16), as ratios to plain torch (matmul, log_softmax, gather,
              entropy); megatron's ``vocab_parallel_cross_entropy`` too when it runs.

Needs only torch and megatron-core (transformer-engine is used for the model's layers when
present). Exit code 1 when any check fails. Run from anywhere::

    bash benchmarks/gpu_smoke.sh                                  # CUDA when available
    bash benchmarks/gpu_smoke.sh --device cpu --shape-tokens 256 --shape-hidden 64 --shape-vocab 512
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from types import SimpleNamespace

# The package is importable from the checkout without installing it.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

# each loss with the run config's defaults (the paper's CE-GPPO settings), CISPO with its usual
# upper clip instead
LOSSES = {"cegppo": {}, "ppo": {}, "cispo": dict(eps_high=0.28), "gspo": {}}

# Tiny model and rollouts for the training steps. Head dim 64 suits every attention backend;
# the vocabulary is padded to 1024, so the padded-column exclusion is on the path.
TINY = SimpleNamespace(
    model_type="qwen2", vocab_size=1000, hidden_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, intermediate_size=512, rms_norm_eps=1e-6,
    rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False,
)
SEQ, MICRO, NUM_MICRO = 64, 4, 2
# Adam's first step moves every weight with a gradient by ~lr; 1e-3 is far above bf16's
# spacing for weights of ~0.02 (1.2e-4), so a step that applies leaves every matrix changed.
LR = 1e-3

# Parity tolerances. Values: max abs error of log-probs and entropy (nats). Gradients: max abs
# error over max |reference gradient|.
#  - fp32: every step is fp32 with fp32 accumulation; observed errors are ~1e-6 on logits of
#    std 3 and a few thousand columns, 1e-4 leaves room for other GEMM orders (TF32 is
#    turned off for the check: it alone gives ~1e-3).
#  - bf16: the reference takes the same bf16 inputs, so the logits path is as exact as in fp32
#    except its returned bf16 gradient (one rounding: 2^-9 relative). The fused path's chunk
#    logits come out of a bf16 GEMM, as megatron's bf16 output layer gives them: each logit
#    is rounded to 8 bits (|error| <= 2^-9 |z|, ~0.03 at |z| ~ 15 for logits of std 3), which
#    moves a log-prob or the entropy by up to a few times that; its gradients carry that
#    relative error plus bf16 GEMMs. Measured at the parity shape below (CPU bf16 GEMMs, the
#    same inputs): 0.041 / 0.044 nats, 2.2e-2 relative. 0.1 nats and 5e-2 relative leave a
#    margin of ~2 and still catch a wrong shard offset, a missed padded column or a lost
#    chunk (errors of order 1).
TOL = {"float32": dict(value=1e-4, grad=1e-4), "bfloat16": dict(value=1e-1, grad=5e-2)}
PARITY_MAX = dict(tokens=2048, hidden=512, vocab=8192)  # the float64 CPU reference stays cheap
PARITY_PAD = 5  # trailing vocabulary columns treated as megatron's padding
LOGIT_STD = 3.0


class Report:
    """Checks (name, passed, detail) and markdown sections, printed as they come."""

    def __init__(self):
        self.checks: list[tuple[str, bool, str]] = []
        self.sections: list[str] = []

    def check(self, name: str, passed: bool, detail: str) -> bool:
        self.checks.append((name, bool(passed), detail))
        print(f"[{'PASS' if passed else 'FAIL'}] {name}: {detail}", flush=True)
        return bool(passed)

    def section(self, title: str, lines: list[str]) -> None:
        self.sections.append("\n".join([f"## {title}", "", *lines]))

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.checks)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]


def _present(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------------------------------
# Setup


def environment(device) -> dict:
    import torch

    try:
        from importlib.metadata import version

        megatron_version = version("megatron-core")
    except Exception:  # noqa: BLE001 - e.g. a source checkout without metadata
        from megatron.core import package_info

        megatron_version = package_info.__version__
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        card=card, device=str(device), torch=torch.__version__, cuda=torch.version.cuda or "-",
        megatron_core=megatron_version, python=platform.python_version(),
        transformer_engine=_present("transformer_engine"), vllm=_present("vllm"), apex=_present("apex"),
    )


def init_distributed(device) -> None:
    """World size 1: NCCL on the GPU, gloo (and the CPU workarounds) on the CPU."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.platform import init_platform, init_process_group
    from megatron_cegppo.testing.multiprocess import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_process_group(init_platform(device.type))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)


def shutdown_distributed() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# 1. One training step per loss


def build_tiny_model(device):
    """The trainer's construction path (an HF-shaped config -> GPTModel in bf16), wrapped in
    megatron's DDP and distributed optimizer as the trainer wraps it."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from megatron_cegppo.models import build_gpt_from_hf

    # on a GPU the chunks come back on it, without apex's softmax kernels unless they are there
    arch, config, (model,), padded = build_gpt_from_hf(TINY, tp=1, pp=1, params_dtype=torch.bfloat16)
    config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True), model)
    return arch, padded, model, ddp


def build_optimizer_bf16(ddp):
    from megatron_cegppo.config.schema import OptimConfig
    from megatron_cegppo.trainer.optim import build_optimizer

    return build_optimizer(OptimConfig(lr=LR, grad_clip=1.0), [ddp], bf16=True)


def synthetic_rollouts(device, vocab: int, seed: int):
    """Micro-batches of prompt + response, label-aligned; advantages are group-normalised
    rewards of groups of 4 responses (GRPO)."""
    import torch

    from megatron_cegppo.algorithms.advantages import grpo_advantages
    from megatron_cegppo.testing.synthetic_batch import random_rollout, rollout_microbatch

    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(NUM_MICRO):
        ids, mask = random_rollout(g, rows=MICRO, seq=SEQ, vocab=vocab, start=(4, SEQ // 2))
        reward = torch.tensor([1.0, 0.0] * (MICRO // 2))[torch.randperm(MICRO, generator=g)]  # a mixed group
        batches.append(rollout_microbatch(ids, mask, grpo_advantages(reward, MICRO)))
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def train_checks(device, report: Report) -> None:
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_cegppo.config.schema import AlgorithmConfig
    from megatron_cegppo.losses import loss_kwargs
    from megatron_cegppo.parallel.pipeline_loss import (
        PolicyLossSpec, make_logprob_forward_step, make_policy_forward_step,
        minibatch_loss_normalizer, reduce_microbatch_metrics,
    )

    arch, padded, model, ddp = build_tiny_model(device)
    optimizer = build_optimizer_bf16(ddp)
    layers = "transformer-engine" if type(model.decoder.layers[0].self_attention.linear_qkv).__module__.startswith(
        "megatron.core.extensions.transformer_engine") else "megatron-core local"
    print(f"tiny GPTModel: {sum(p.numel() for p in model.parameters()):,} parameters, layers: {layers}, "
          f"dtype {next(model.parameters()).dtype}, vocab {arch.vocab_size} (padded {padded})", flush=True)
    schedule = get_forward_backward_func()
    shape = dict(model=ddp, num_microbatches=NUM_MICRO, seq_length=SEQ, micro_batch_size=MICRO)
    rows = []
    for i, (name, overrides) in enumerate(LOSSES.items()):
        kwargs = {**loss_kwargs(name, AlgorithmConfig()), **overrides}
        impl = ("logits", "fused")[i % 2]  # both log-prob paths of the pipeline loss, in turn
        spec = PolicyLossSpec(loss=name, loss_kwargs=kwargs, vocab_size=arch.vocab_size, logprob_impl=impl)
        batches = synthetic_rollouts(device, arch.vocab_size, seed=i)
        # Old log-probs: the current policy's, recomputed as the trainer does, then moved by
        # noise so that ratios fall on both sides of the clip range.
        stores = schedule(forward_step_func=make_logprob_forward_step(spec), data_iterator=iter(batches),
                          forward_only=True, **shape)
        g = torch.Generator().manual_seed(100 + i)
        for b, s in zip(batches, stores):
            b["old_log_prob"] = s["log_prob"] + 0.3 * torch.randn(s["log_prob"].shape, generator=g).to(device)
        norm = minibatch_loss_normalizer([b["loss_mask"] for b in batches], spec.loss_agg_mode)
        for b in batches:
            b["loss_normalizer"] = norm
        stores = schedule(forward_step_func=make_policy_forward_step(spec, num_microbatches=NUM_MICRO),
                          data_iterator=iter(batches), **shape)
        metrics = reduce_microbatch_metrics([dict(s) for s in stores])
        grads = [p.main_grad for p in model.parameters()]
        grads_finite = all(bool(torch.isfinite(gr).all()) for gr in grads)
        before = [p.detach().clone() for p in model.parameters()]
        updated, grad_norm, _ = optimizer.step()
        matrices = [(b, p) for b, p in zip(before, model.parameters()) if p.dim() >= 2]
        moved = sum(not torch.equal(b, p) for b, p in matrices)
        max_change = max(float((b.float() - p.detach().float()).abs().max())
                         for b, p in zip(before, model.parameters()))
        ddp.zero_grad_buffer()
        optimizer.zero_grad()

        loss, grad_norm = metrics["loss"], float(grad_norm) if grad_norm is not None else math.nan
        ok = (math.isfinite(loss) and grads_finite and math.isfinite(grad_norm) and grad_norm > 0
              and bool(updated) and moved == len(matrices))
        detail = (f"loss {loss:.5f}, grad norm {grad_norm:.4f}, grads finite: {grads_finite}, "
                  f"weight matrices moved {moved}/{len(matrices)} (max |dw| {max_change:.2e}), "
                  f"entropy {metrics['entropy']:.3f}")
        report.check(f"train {name}", ok, f"({impl}) {detail}")
        clip = [metrics[k] for k in ("clipfrac_low", "clipfrac_high") if k in metrics]
        rows.append([name, impl, f"{loss:.5f}", f"{grad_norm:.4f}", str(grads_finite), f"{moved}/{len(matrices)}",
                     f"{max_change:.2e}", f"{metrics['entropy']:.3f}", f"{sum(clip):.3f}" if clip else "-",
                     "PASS" if ok else "FAIL"])
    del optimizer, ddp, model
    report.section("1. One training step per loss", [
        f"Tiny Qwen2-shaped GPTModel ({TINY.num_hidden_layers} layers, hidden {TINY.hidden_size}, "
        f"vocab {TINY.vocab_size} padded to {padded}), {layers} layers, bf16 params, DDP "
        f"(grad_reduce_in_fp32) + distributed optimizer (Adam, lr {LR}, clip 1.0), {NUM_MICRO} "
        f"micro-batches of {MICRO} x {SEQ} tokens, world size 1.", "",
        *_table(["loss", "log-prob impl", "loss value", "grad norm", "grads finite", "matrices moved", "max abs dw",
                 "entropy", "clip frac", "check"], rows),
    ])


# ------------------------------------------------------------------------------------------
# 2. Parity with a float64 reference


def dense_reference(z, labels, vocab_size, w_lp, w_ent):
    """float64 CPU log-probs, entropy and the gradient of ``sum(w_lp lp + w_ent H)`` with
    respect to ``z`` (logits [N, V], padded columns at and past ``vocab_size``)."""
    import torch

    z = z.detach().double().cpu().requires_grad_(True)
    logp = torch.log_softmax(z[:, :vocab_size], dim=-1)
    lp = logp.gather(1, labels.cpu()[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    (lp * w_lp.double().cpu() + ent * w_ent.double().cpu()).sum().backward()
    return lp.detach(), ent.detach(), z.grad


def _errors(got: dict, ref: dict) -> dict:
    """Max abs error of values; of gradients, relative to max |reference gradient|."""
    out = {}
    for key, value in got.items():
        diff = float((value.detach().double().cpu() - ref[key]).abs().max())
        out[key] = diff if key in ("lp", "ent") else diff / max(float(ref[key].abs().max()), 1e-30)
    return out


def parity_checks(device, tokens: int, hidden: int, vocab: int, report: Report) -> None:
    import torch

    from megatron_cegppo.parallel import fused_vocab_parallel_logprobs_entropy, vocab_parallel_logprobs_entropy

    n, h, v = min(tokens, PARITY_MAX["tokens"]), min(hidden, PARITY_MAX["hidden"]), min(vocab, PARITY_MAX["vocab"])
    true_vocab = v - PARITY_PAD
    chunk = n // 3 + 1  # three chunks, the last one short
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, true_vocab, (n,), generator=g)
    w_lp, w_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    logits32 = torch.randn(n, v, generator=g) * LOGIT_STD
    hidden32 = torch.randn(n, h, generator=g)
    weight32 = torch.randn(v, h, generator=g) * (LOGIT_STD / h**0.5)
    on = dict(labels=labels.to(device), w_lp=w_lp.to(device), w_ent=w_ent.to(device))
    kw = dict(vocab_size=true_vocab, chunk_size=chunk)
    # GEMMs as exact as the device allows (TF32 off is torch's default; bf16 split-K partial
    # sums in fp32): the check is about our code, not the GEMM settings.
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction = False, False
    rows = []
    try:
        for dtype in (torch.float32, torch.bfloat16):
            dname = str(dtype).replace("torch.", "")
            tol = TOL[dname]
            # The reference takes the inputs rounded to ``dtype``, exactly as the device does.
            logits = logits32.to(dtype)
            lp_ref, ent_ref, grad_ref = dense_reference(logits, labels, true_vocab, w_lp, w_ent)
            x = logits.to(device, copy=True).requires_grad_(True)
            lp, ent = vocab_parallel_logprobs_entropy(x, on["labels"], **kw)
            (lp * on["w_lp"] + ent * on["w_ent"]).sum().backward()
            cases = [("logits", _errors(dict(lp=lp, ent=ent, grad_logits=x.grad),
                                        dict(lp=lp_ref, ent=ent_ref, grad_logits=grad_ref)))]

            hid, wt = hidden32.to(dtype), weight32.to(dtype)
            hd = hid.double().requires_grad_(True)
            wd = wt.double().requires_grad_(True)
            lp_ref, ent_ref, z_grad = dense_reference(hd.detach() @ wd.detach().t(), labels, true_vocab, w_lp, w_ent)
            (hd @ wd.t()).backward(z_grad)
            hx = hid.to(device, copy=True).requires_grad_(True)
            wx = wt.to(device, copy=True).requires_grad_(True)
            lp, ent = fused_vocab_parallel_logprobs_entropy(hx, wx, on["labels"], **kw)
            (lp * on["w_lp"] + ent * on["w_ent"]).sum().backward()
            cases.append(("fused", _errors(dict(lp=lp, ent=ent, grad_hidden=hx.grad, grad_weight=wx.grad),
                                           dict(lp=lp_ref, ent=ent_ref, grad_hidden=hd.grad, grad_weight=wd.grad))))
            for impl, err in cases:
                grads = {k: e for k, e in err.items() if k.startswith("grad")}
                ok = err["lp"] <= tol["value"] and err["ent"] <= tol["value"] and max(grads.values()) <= tol["grad"]
                detail = (f"max abs err log-prob {err['lp']:.2e}, entropy {err['ent']:.2e} (tol {tol['value']:g}); "
                          + ", ".join(f"{k} {e:.2e}" for k, e in grads.items())
                          + f" of max |ref| (tol {tol['grad']:g})")
                report.check(f"parity {impl} {dname}", ok, detail)
                rows.append([impl, dname, f"{err['lp']:.2e}", f"{err['ent']:.2e}",
                             ", ".join(f"{k.replace('grad_', '')} {e:.2e}" for k, e in grads.items()),
                             f"{tol['value']:g} / {tol['grad']:g}", "PASS" if ok else "FAIL"])
    finally:
        matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction = saved
    report.section("2. Log-prob / entropy parity with float64", [
        f"Tokens {n}, hidden {h}, vocabulary {v} of which the last {PARITY_PAD} columns are padding, "
        f"logits of std {LOGIT_STD}, chunks of {chunk} tokens; loss sum(w1 log_prob + w2 entropy) with "
        "random w1, w2. Reference: float64 dense log_softmax on the CPU of the same (rounded) inputs. "
        "Values: max abs error (nats); gradients: max abs error / max |reference gradient|.", "",
        *_table(["impl", "dtype", "log-prob err", "entropy err", "gradient err (relative)", "tol value / grad",
                 "check"], rows),
    ])


# ------------------------------------------------------------------------------------------
# 3. Time and peak memory at a realistic shape


def _torch_baseline(hidden, weight, labels):
    import torch

    logp = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    return logp.gather(1, labels[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


def _megatron_ce(hidden, weight, labels):
    """megatron's cross entropy for the log-probs (it upcasts bf16 logits to an fp32 copy and
    subtracts the max in that copy, so ``logits`` is left intact), entropy from a softmax."""
    import torch
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = hidden @ weight.t()
    lp = -vocab_parallel_cross_entropy(logits if logits.dtype != torch.float32 else logits.clone(), labels)
    x = logits.float()
    return lp, torch.logsumexp(x, dim=-1) - (torch.softmax(x, dim=-1) * x).sum(-1)


def _ours_logits(hidden, weight, labels):
    from megatron_cegppo.parallel import vocab_parallel_logprobs_entropy

    return vocab_parallel_logprobs_entropy(hidden @ weight.t(), labels)


def _ours_fused(hidden, weight, labels):
    from megatron_cegppo.parallel import fused_vocab_parallel_logprobs_entropy

    return fused_vocab_parallel_logprobs_entropy(hidden, weight, labels)


IMPLS = {  # the first one is the baseline of the ratios
    "torch baseline": _torch_baseline,
    "megatron cross entropy": _megatron_ce,
    "ours logits": _ours_logits,
    "ours fused": _ours_fused,
}
OPTIONAL = ("megatron cross entropy",)  # reported, not a failure, when it does not run


def _measure(fn, inputs, device, warmup: int, reps: int):
    """Median ms of forward + backward and the peak allocated bytes above the inputs."""
    import torch

    hidden, weight, labels, w_lp, w_ent = inputs
    cuda = device.type == "cuda"

    def step():
        lp, ent = fn(hidden, weight, labels)
        (lp * w_lp + ent * w_ent).sum().backward()
        hidden.grad = weight.grad = None

    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    return statistics.median(times), peak


def timing(device, tokens: int, hidden: int, vocab: int, warmup: int, reps: int, report: Report) -> None:
    import torch

    g = torch.Generator().manual_seed(1)
    # Built on the CPU from one generator (the same numbers on any device), then moved.
    inputs = (
        torch.randn(tokens, hidden, generator=g).to(device, torch.bfloat16).requires_grad_(True),
        (torch.randn(vocab, hidden, generator=g) * (LOGIT_STD / hidden**0.5)).to(device, torch.bfloat16)
        .requires_grad_(True),
        torch.randint(0, vocab, (tokens,), generator=g).to(device),
        torch.randn(tokens, generator=g).to(device),
        torch.randn(tokens, generator=g).to(device),
    )
    with torch.no_grad():  # the GEMM library's workspace, kept from now on: in no one's peak
        inputs[0] @ inputs[1].t()
    results, outputs = {}, {}
    for name, fn in IMPLS.items():
        try:
            results[name] = _measure(fn, inputs, device, warmup, reps)
            with torch.no_grad():
                outputs[name] = [t.float() for t in fn(*inputs[:3])]
        except Exception as exc:  # noqa: BLE001 - reported as a check (or a skip) below
            # Only the message is kept: the traceback would hold the failed step's tensors.
            results[name] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            inputs[0].grad = inputs[1].grad = None
            del exc
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = results["torch baseline"]
    base_ms, base_peak = (None, None) if isinstance(base, str) else base
    rows = []
    for name, res in results.items():
        if isinstance(res, str):
            msg = res
            if name in OPTIONAL:
                print(f"[skip] timing {name}: {msg}", flush=True)
            else:
                report.check(f"timing {name}", False, msg)
            rows.append([name, "-", "-", "-", "-", ("skipped: " if name in OPTIONAL else "FAIL: ") + msg])
            continue
        ms, peak = res
        lp, ent = outputs[name]
        ref_lp, ref_ent = outputs.get("torch baseline", (lp, ent))
        # Against the baseline at full size: both round the logits to bf16, but from GEMMs of
        # other shapes (the fused one per chunk), so a logit may land one bf16 step away
        # (0.06 at |z| in [8, 16)): the bf16 parity tolerance applies.
        diff = max(float((lp - ref_lp).abs().max()), float((ent - ref_ent).abs().max()))
        time_ratio = f"{ms / base_ms:.2f}" if base_ms else "-"
        mem = f"{peak / 2**20:,.0f}" if peak is not None else "n/a"
        mem_ratio = f"{peak / base_peak:.2f}" if peak is not None and base_peak else "-"
        ok = diff <= TOL["bfloat16"]["value"]
        if name not in OPTIONAL:
            report.check(f"timing {name}", ok,
                         f"{ms:.2f} ms ({time_ratio} x baseline), peak extra MiB {mem} ({mem_ratio} x baseline), "
                         f"max |diff| vs baseline {diff:.1e}")
        else:
            print(f"[info] timing {name}: {ms:.2f} ms ({time_ratio} x baseline), peak extra MiB {mem} "
                  f"({mem_ratio} x baseline), max |diff| vs baseline {diff:.1e}", flush=True)
        rows.append([name, f"{ms:.2f}", time_ratio, mem, mem_ratio, f"{diff:.1e}"])
    report.section("3. Time and peak memory, forward + backward", [
        f"Tokens {tokens}, hidden {hidden}, vocabulary shard {vocab} (TP1), bf16 hidden states and "
        "output weight, from `hidden @ weight.T` (the fused implementation never forms it) to the "
        "gradients of both; loss sum(w1 log_prob + w2 entropy). Median of "
        f"{reps} after {warmup} warm-up; peak extra = max_memory_allocated minus the allocated "
        "bytes once the inputs exist (includes the two input gradients).", "",
        *_table(["implementation", "ms", "time x baseline", "peak extra MiB", "memory x baseline",
                 "max abs diff vs baseline"], rows),
    ])


# ------------------------------------------------------------------------------------------


def run_parts(report: Report, parts) -> None:
    """Runs each ``(title, fn)``; one that raises is a failed check, and the others still run."""
    for title, fn in parts:
        t = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one broken part must not hide the others
            import traceback

            traceback.print_exc()
            report.check(f"{title} ran", False, f"{type(exc).__name__}: {exc}")
        print(f"-- {title}: {time.perf_counter() - t:.1f} s", flush=True)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "unknown"


def write_markdown(path: str, env: dict, args, report: Report, *, title: str = "GPU smoke check",
                   script: str = "python benchmarks/gpu_smoke.py") -> None:
    lines = [
        f"# {title}: {env['card']}", "",
        f"- Date: {env['date']}",
        f"- Device: {env['device']} ({env['card']})",
        f"- torch {env['torch']} (CUDA {env['cuda']}), megatron-core {env['megatron_core']}, "
        f"Python {env['python']}",
        f"- transformer-engine: {'present' if env['transformer_engine'] else 'absent'}, "
        f"vLLM: {'present' if env['vllm'] else 'absent'}, apex: {'present' if env['apex'] else 'absent'}",
        f"- Command: `{script} {' '.join(args.argv)}`",
        f"- Result: {'PASS' if report.passed else 'FAIL'} "
        f"({sum(ok for _, ok, _ in report.checks)}/{len(report.checks)} checks)", "",
        "## Checks", "",
        *_table(["check", "result", "detail"], [[n, "PASS" if ok else "FAIL", d] for n, ok, d in report.checks]),
        "", "\n\n".join(report.sections), "",
    ]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print(f"results: {path}", flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    parser.add_argument("--shape-tokens", type=int, default=16384)
    parser.add_argument("--shape-hidden", type=int, default=5120)
    parser.add_argument("--shape-vocab", type=int, default=19008, help="vocabulary shard (152064 / TP8)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None,
                        help="markdown results file (default on CUDA: benchmarks/results/gpu_smoke_<card>_<date>.md)")
    args = parser.parse_args(argv)
    if min(args.shape_tokens, args.shape_hidden, args.shape_vocab, args.reps) < 1 or args.warmup < 0:
        parser.error("shapes and --reps must be >= 1, --warmup >= 0")
    if args.shape_vocab <= PARITY_PAD:
        parser.error(f"--shape-vocab must be > {PARITY_PAD} (the parity check pads {PARITY_PAD} columns)")
    args.argv = argv
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch: every "is CUDA there" answers no
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecations
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")  # said once below

    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")

    env = environment(device)
    print(f"# gpu_smoke {env['date']}: {env['card']}; torch {env['torch']} (CUDA {env['cuda']}), "
          f"megatron-core {env['megatron_core']}", flush=True)
    for pkg, what in (("transformer_engine", "its layer spec is used for the model"), ("vllm", "not exercised here")):
        print(f"{pkg}: " + (f"present ({what})" if env[pkg] else "absent, skipped"), flush=True)
    if device.type == "cuda" and not env["transformer_engine"]:
        print("model layers: megatron-core's local spec (torch norms and linears)", flush=True)

    report = Report()
    t0 = time.perf_counter()
    init_distributed(device)
    try:
        run_parts(report, [
            ("train", lambda: train_checks(device, report)),
            ("parity", lambda: parity_checks(device, args.shape_tokens, args.shape_hidden, args.shape_vocab, report)),
            ("timing", lambda: timing(device, args.shape_tokens, args.shape_hidden, args.shape_vocab,
                                      args.warmup, args.reps, report)),
        ])
    finally:
        shutdown_distributed()
    print(f"{'PASS' if report.passed else 'FAIL'}: {sum(ok for _, ok, _ in report.checks)}/{len(report.checks)} "
          f"checks passed in {time.perf_counter() - t0:.0f} s", flush=True)
    out = args.out
    if out is None and device.type == "cuda":
        out = os.path.join(_REPO_ROOT, "benchmarks", "results", f"gpu_smoke_{_slug(env['card'])}_{env['date']}.md")
    if out:
        write_markdown(out, env, args, report)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
