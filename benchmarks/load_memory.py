"""Peak host memory of each rank while importing an HF folder into megatron chunks: the
full-state path (``read_hf_state`` + ``import_hf_weights(chunks, state_dict, ...)``) against
the sliced folder path (``import_hf_weights(chunks, folder, ...)``).

Makes a Qwen2-shaped model of a few hundred MB (bf16, several safetensors files with an index)
in a temporary folder, then, in real processes joined by gloo, at TP2 and TP2 x PP2: builds the
chunks, resets the process's peak-RSS counter (``/proc/self/clear_refs``), loads, and reports
the peak RSS (``VmHWM``) minus the RSS before loading. Each (layout, path) runs in fresh
processes, so neither path inherits the other's freed heap or its high-water mark.

    python benchmarks/load_memory.py [--layers 12] [--hidden 1024] [--out results.md]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_cegppo.testing.multiprocess import run_distributed  # noqa: E402

MiB = 1 << 20


def make_model(folder: Path, args) -> int:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=args.hidden, num_attention_heads=args.hidden // 64, num_key_value_heads=4,
                         head_dim=64, num_hidden_layers=args.layers, intermediate_size=args.ffn,
                         vocab_size=args.vocab, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size=args.max_shard)
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    del model
    gc.collect()
    return size


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the process's peak RSS (VmHWM)
        return True
    except OSError:
        return False


def worker(rank, world, folder, tp, pp, path, params_dtype):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.models import build_gpt_from_hf, import_hf_weights, read_hf_config, read_hf_state
    from megatron_cegppo.cpu_compat import apply_cpu_compat

    apply_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(0)
    arch, _, chunks, padded = build_gpt_from_hf(read_hf_config(folder), tp=tp, pp=pp,
                                                params_dtype=getattr(torch, params_dtype))
    shard = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    gc.collect()
    torch.distributed.barrier()
    reset = _reset_peak()
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    if path == "full-state":
        state = read_hf_state(folder)
        import_hf_weights(chunks, state, arch, padded)
        del state
    else:
        import_hf_weights(chunks, folder, arch, padded)
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: a spawned process's ru_maxrss also keeps the peak of the process
    # image it was exec'ed from (the parent's, which made the model)
    peak = _status_kib("VmHWM")
    digest = hashlib.sha256()
    for c in chunks:
        for _, p in sorted(c.named_parameters()):
            digest.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    torch.distributed.barrier()
    return dict(rank=rank, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                pp_rank=parallel_state.get_pipeline_model_parallel_rank(), shard=shard, before_kib=before,
                peak_kib=peak, reset=reset, seconds=seconds, digest=digest.hexdigest())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-shard", default="100MB")
    parser.add_argument("--params-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--layouts", default="2x1,2x2", help="TPxPP, comma-separated")
    parser.add_argument("--out", type=Path, default=None, help="write a markdown report here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "qwen2"
        size = make_model(folder, args)
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        print(f"model: {size / MiB:.0f} MiB bf16 in {len(files)} files "
              f"(hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, vocab {args.vocab})", flush=True)
        for layout in args.layouts.split(","):
            tp, pp = map(int, layout.split("x"))
            results = {}
            for path in ("full-state", "sliced"):
                results[path] = run_distributed(worker, tp * pp, str(folder), tp, pp, path, args.params_dtype,
                                                timeout=900)
            for full, sliced in zip(results["full-state"], results["sliced"]):
                assert full["reset"] and sliced["reset"], "could not reset the peak RSS counter"
                same = full["digest"] == sliced["digest"]
                delta_full = (full["peak_kib"] - full["before_kib"]) * 1024
                delta_sliced = (sliced["peak_kib"] - sliced["before_kib"]) * 1024
                row = dict(layout=f"TP{tp}xPP{pp}", rank=full["rank"], tp_rank=full["tp_rank"],
                           pp_rank=full["pp_rank"], shard=full["shard"], full=delta_full, sliced=delta_sliced,
                           full_peak=full["peak_kib"] * 1024, sliced_peak=sliced["peak_kib"] * 1024,
                           full_s=full["seconds"], sliced_s=sliced["seconds"], same=same)
                rows.append(row)
                print(f"{row['layout']} rank {row['rank']} (tp {row['tp_rank']}, pp {row['pp_rank']}): shard "
                      f"{row['shard'] / MiB:.0f} MiB; load peak above pre-load RSS: full-state "
                      f"{delta_full / MiB:.0f} MiB ({delta_full / size:.2f}x model), sliced "
                      f"{delta_sliced / MiB:.0f} MiB ({delta_sliced / size:.2f}x model); ratio "
                      f"{delta_full / max(delta_sliced, 1):.1f}x; absolute peak {row['full_peak'] / MiB:.0f} vs "
                      f"{row['sliced_peak'] / MiB:.0f} MiB; {row['full_s']:.1f} s vs {row['sliced_s']:.1f} s; "
                      f"weights identical: {same}", flush=True)
    if args.out is not None:
        write_report(args, size, len(files), rows)


def write_report(args, size, n_files, rows) -> None:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:5]
    lines = [
        f"# Host memory while importing an HF folder, per rank ({date.today().isoformat()})",
        "",
        "`python benchmarks/load_memory.py --out ...` (CPU, gloo, torch "
        f"{torch.__version__}, Python {platform.python_version()}).",
        "",
        "Machine (`lscpu | head -5`):",
        "```",
        *cpu,
        "```",
        "",
        f"Model: Qwen2 shape, hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, vocab {args.vocab}, "
        f"untied; {size / MiB:.0f} MiB of bf16 tensors in {n_files} safetensors files with an index. "
        f"Parameters in {args.params_dtype}.",
        "",
        "Columns: the rank's own shard (its parameters); the peak RSS during the load (`VmHWM` of "
        "`/proc/self/status` after resetting it with `/proc/self/clear_refs`) minus the RSS just before it, for the full-state path "
        "(`read_hf_state` + `import_hf_weights(chunks, state_dict, ...)`) and for the sliced folder path "
        "(`import_hf_weights(chunks, folder, ...)`); each path in fresh processes. RSS counts the pages of "
        "the memory-mapped files a read touches as well as the copies. The sliced path reads at most "
        "`read_chunk_bytes` (64 MiB by default) of full rows per read, then unmaps them.",
        "",
        "| layout | rank (tp, pp) | shard MiB | full-state peak above pre-load MiB (x model) | "
        "sliced peak above pre-load MiB (x model) | ratio | absolute peak RSS full / sliced MiB | "
        "load s full / sliced | weights identical |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['rank']} ({r['tp_rank']}, {r['pp_rank']}) | {r['shard'] / MiB:.0f} | "
            f"{r['full'] / MiB:.0f} ({r['full'] / size:.2f}) | {r['sliced'] / MiB:.0f} ({r['sliced'] / size:.2f}) | "
            f"{r['full'] / max(r['sliced'], 1):.1f}x | {r['full_peak'] / MiB:.0f} / {r['sliced_peak'] / MiB:.0f} | "
            f"{r['full_s']:.1f} / {r['sliced_s']:.1f} | {'yes' if r['same'] else 'NO'} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
