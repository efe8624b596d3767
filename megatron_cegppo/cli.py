"""``megatron-cegppo``: train, eval, sweep. Configs are loaded and validated before torch,
megatron or vLLM are imported, so a bad config fails in a second with every problem named."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

EXIT_STOPPED = 3  # saved a checkpoint and stopped on request (SIGTERM/SIGUSR1/STOP file)
LAYER_CHOICES = ("auto", "transformer_engine", "local")
LAYERS_HELP = ("the layer implementation to plan for; auto: transformer-engine where megatron can import it in "
               "this environment (the job's, on a shared file system), megatron's local layers otherwise")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-cegppo", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="CE-GPPO training (start with torchrun for several processes)")
    t.add_argument("--config", required=True, help="YAML file (see configs/)")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. algorithm.beta1=0.75")
    v = sub.add_parser("validate", help="check a config (and a world size) without running anything")
    v.add_argument("--config", required=True)
    v.add_argument("--world-size", type=int, default=None)
    v.add_argument("overrides", nargs="*")
    e = sub.add_parser("eval", help="accuracy avg@k of a model on a prompt file, with vLLM")
    e.add_argument("--config", required=True)
    e.add_argument("--data", required=True, help="JSONL or parquet with prompt and answer fields")
    e.add_argument("--k", type=int, default=8)
    e.add_argument("--model", default=None, help="HF folder (default: the config's model.path)")
    e.add_argument("overrides", nargs="*")
    x = sub.add_parser("export", help="an HF folder (safetensors, config, tokenizer) from a checkpoint")
    x.add_argument("--config", required=True)
    x.add_argument("--out", required=True, help="the folder to write")
    x.add_argument("--checkpoint", default=None, help="a step_* folder (default: the run's latest)")
    x.add_argument("--shard-size", default="5GB", help="the largest safetensors file: 5GB, 500MB, 2GiB or bytes")
    x.add_argument("--force", action="store_true", help="replace --out even when it is not an earlier export")
    x.add_argument("overrides", nargs="*")
    s = sub.add_parser("submit", help="write and submit the Slurm batch script of a config")
    s.add_argument("--config", required=True)
    s.add_argument("--nodes", type=int, default=None, help="default: cluster.nodes")
    s.add_argument("--gpus-per-node", type=int, default=None, help="default: cluster.gpus_per_node")
    s.add_argument("--time", default="24:00:00")
    s.add_argument("--partition", default=None)
    s.add_argument("--cpus-per-task", type=int, default=64, help="CPU cores per node's task")
    s.add_argument("--signal-seconds", default="auto",
                   help="USR1 this long before the time limit; auto (default): what one step and a save needed "
                        "in a previous start of the run (its timing.json), at least 300")
    s.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    s.add_argument("--force", action="store_true", help="submit even when the memory plan says it does not fit")
    s.add_argument("--layers", choices=LAYER_CHOICES, default="auto", help=LAYERS_HELP)
    s.add_argument("overrides", nargs="*")
    n = sub.add_parser("plan", help="per-GPU memory of a config, training and generation: does it fit?")
    n.add_argument("--config", required=True)
    n.add_argument("--nodes", type=int, default=None, help="default: cluster.nodes")
    n.add_argument("--layers", choices=LAYER_CHOICES, default="auto", help=LAYERS_HELP)
    n.add_argument("overrides", nargs="*")
    w = sub.add_parser("sweep", help="settings x seeds, one run after another (a killed sweep resumes where it "
                                     "stopped), then a summary over seeds: a table and plots")
    w.add_argument("--config", required=True)
    w.add_argument("--out", required=True, help="the sweep's folder: <setting>/seed<N>/ per run, the summary")
    w.add_argument("--grid", action="append", default=[],
                   help="section.key=v1,v2,...; several --grid: every combination")
    w.add_argument("--setting", action="append", default=[],
                   help="'NAME section.key=value ...': a named setting (crossed with the --grid product if any)")
    w.add_argument("--seeds", default="0", help="comma-separated trainer.seed values, e.g. 0,1,2")
    w.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun --nproc-per-node)")
    w.add_argument("--summary-only", action="store_true", help="write the summary of the runs so far, run nothing")
    w.add_argument("overrides", nargs="*", help="section.key=value for every run")
    return p


def _sweep(args) -> int:
    """Checks every run of the sweep, runs those not yet done, and writes the summary."""
    import json
    from pathlib import Path

    from megatron_cegppo.config import ConfigError
    from megatron_cegppo.sweep.plan import SweepError, parse_seeds, plan_runs, run_problems

    out = Path(args.out)
    try:
        if args.nproc < 1:
            raise SweepError([f"--nproc must be >= 1, got {args.nproc}"])
        runs = plan_runs(out, args.grid, args.setting, parse_seeds(args.seeds), args.overrides)
        found = run_problems(args.config, runs, args.nproc)
    except SweepError as exc:
        print(f"megatron-cegppo: {exc}", file=sys.stderr)
        return 2
    if found:
        print(f"megatron-cegppo: {ConfigError.of(found, 'invalid sweep')}", file=sys.stderr)
        return 2
    from megatron_cegppo.sweep.runner import SweepRunner
    from megatron_cegppo.sweep.summary import summarize

    outcomes = []
    if not args.summary_only:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps({"config": args.config, "grid": args.grid, "setting": args.setting,
                                                    "seeds": args.seeds, "nproc": args.nproc,
                                                    "overrides": args.overrides}, indent=1) + "\n")
        print(f"[sweep] {len(runs)} runs into {out}", flush=True)
        outcomes = SweepRunner(args.config, runs, nproc=args.nproc, log=lambda line: print(line, flush=True),
                               after_run=lambda: summarize(runs, out)).run()
    summarize(runs, out)
    print(f"[sweep] summary: {out / 'summary.md'}", flush=True)
    statuses = {o.status for o in outcomes}
    return 1 if "failed" in statuses else EXIT_STOPPED if "stopped" in statuses else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_cegppo.config import ConfigError

    args = _parser().parse_args(argv)
    if args.command == "sweep":
        return _sweep(args)
    try:
        cfg = _checked_config(args)
    except ConfigError as exc:
        if _reports(args):
            print(f"megatron-cegppo: {exc}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(f"{args.config}: valid")
        return 0
    if args.command == "plan":
        return _plan(cfg, args)
    if args.command == "train":
        from megatron_cegppo.trainer.failure import run_reporting_failures

        def run() -> int:
            from megatron_cegppo.trainer.loop import train

            return 0 if train(cfg) else EXIT_STOPPED

        return run_reporting_failures(run, cfg.trainer.run_dir)
    if args.command == "submit":
        from pathlib import Path

        from megatron_cegppo.slurm import render_sbatch, resolve_signal_seconds, submit

        refused = _preflight(cfg, args)
        if refused:
            return refused
        signal_seconds = resolve_signal_seconds(args.signal_seconds, cfg.trainer.run_dir)  # its form checked
        script = render_sbatch(config=args.config, overrides=args.overrides, run_dir=cfg.trainer.run_dir,
                               nodes=cfg.cluster.nodes, gpus_per_node=cfg.cluster.gpus_per_node, time=args.time,
                               partition=args.partition, signal_seconds=signal_seconds,
                               cpus_per_task=args.cpus_per_task)
        (Path(cfg.trainer.run_dir) / "logs").mkdir(parents=True, exist_ok=True)  # slurmd opens --output there
        submit(script, Path(cfg.trainer.run_dir) / "cegppo.sbatch", args.dry_run)
        return 0
    if args.command == "export":
        from megatron_cegppo.checkpoint.export import check_export_target, export_checkpoint, parse_shard_size
        from megatron_cegppo.checkpoint.store import CheckpointError

        try:
            shard_size = parse_shard_size(args.shard_size)
            check_export_target(args.out, force=args.force)
            export_checkpoint(cfg, args.checkpoint, args.out, shard_size=shard_size, force=args.force)
        except (ValueError, CheckpointError) as exc:
            print(f"megatron-cegppo: {exc}", file=sys.stderr)
            return 2
        return 0
    from megatron_cegppo.data.prompts import DataError
    from megatron_cegppo.evaluate import evaluate

    try:
        result = evaluate(cfg, args.data, k=args.k)
    except DataError as exc:  # e.g. prompts longer than the model allows
        print(f"megatron-cegppo: {exc}", file=sys.stderr)
        return 2
    print(f"accuracy avg@{args.k}: {result['accuracy']:.4f} over {result['prompts']} prompts")
    return 0


# --- checks before anything heavy starts or anything is written ------------------------------

def _reports(args) -> bool:
    """Whether this process prints a refusal: torchrun starts one ``train`` per GPU, and one
    message per node is enough."""
    return args.command != "train" or os.environ.get("LOCAL_RANK", "") in ("", "0")


def _checked_config(args):
    """The config of ``args``, or one :class:`ConfigError` naming every problem of the
    arguments, the config and the files it names."""
    from megatron_cegppo.config import ConfigError, load_config, problems

    wrong = _argument_problems(args)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise _refusal(wrong, exc.problems) from None
    _apply_arguments(cfg, args)
    found = problems(cfg, None if wrong else _world_size(cfg, args), train_data=args.command != "eval")
    if args.command == "validate" and not found and not wrong:
        found += _shape_problems(cfg, args.world_size)  # it divides by settings checked above
    files = _file_problems(cfg, args, wrong) if args.command in ("validate", "train", "submit", "eval") else []
    if args.command == "submit" and args.dry_run and not wrong and not found:
        _warn_dry_run(files)  # a script may be prepared before its files are in place
    elif wrong or found or files:
        raise _refusal(wrong, found + files)
    return cfg


def _warn_dry_run(files: list) -> None:
    if files:
        print("megatron-cegppo: warning: submitting this script (without --dry-run) would be refused:\n  - "
              + "\n  - ".join(files), file=sys.stderr)


def _refusal(wrong: list, found: list):
    from megatron_cegppo.config import ConfigError

    header = ("invalid arguments and config" if wrong and found else "invalid arguments" if wrong
              else "invalid config")
    return ConfigError.of(wrong + found, header)


def _argument_problems(args) -> list:
    """The command line's own problems, one line each."""
    out = []
    if args.command == "validate" and args.world_size is not None and args.world_size < 1:
        out.append(f"--world-size must be >= 1, got {args.world_size}")
    if args.command in ("submit", "plan") and args.nodes is not None and args.nodes < 1:
        out.append(f"--nodes must be >= 1, got {args.nodes}")
    if args.command in ("train", "export"):
        text = os.environ.get("WORLD_SIZE", "1")
        if not text.strip().isdigit() or int(text) < 1:
            out.append(f"WORLD_SIZE must be a positive integer, got {text!r}")
    if args.command == "submit":
        out.extend(_submit_problems(args))
    if args.command == "export":
        from megatron_cegppo.checkpoint.export import parse_shard_size

        try:
            parse_shard_size(args.shard_size)
        except ValueError as exc:
            out.append(str(exc))
    if args.command == "eval":
        if args.k < 1:
            out.append(f"--k must be >= 1, got {args.k}")
        out.extend(_data_file_problems(args.data))
    return out


def _submit_problems(args) -> list:
    """What sbatch would refuse, before the script is written."""
    from megatron_cegppo.slurm import signal_seconds_problem, time_limit_problem

    out = []
    if args.gpus_per_node is not None and args.gpus_per_node < 0:
        out.append(f"--gpus-per-node must be >= 0, got {args.gpus_per_node}")
    if args.cpus_per_task < 1:
        out.append(f"--cpus-per-task must be >= 1, got {args.cpus_per_task}")
    out.extend(p for p in (time_limit_problem(args.time), signal_seconds_problem(args.signal_seconds)) if p)
    return out


def _data_file_problems(path: str) -> list:
    """``eval --data``: a readable file."""
    from pathlib import Path

    if not path:
        return ["--data must name a JSONL or parquet file of prompts and answers, got ''"]
    data = Path(path)
    if not data.exists():
        return [f"--data {path} does not exist"]
    if not data.is_file():
        return [f"--data {path} is not a file (a JSONL or parquet file of prompts and answers)"]
    if not os.access(data, os.R_OK):
        return [f"--data {path} cannot be read (permission denied)"]
    return []


def _apply_arguments(cfg, args) -> None:
    """The command line's settings in ``cfg``: the cluster size (which the plan reads) and
    eval's model and prompts. A refused value is left out (it is named once, as an argument)."""
    if args.command in ("submit", "plan"):
        if args.nodes is not None and args.nodes >= 1:
            cfg.cluster.nodes = args.nodes
        gpus = getattr(args, "gpus_per_node", None)
        if gpus is not None and gpus >= 0:
            cfg.cluster.gpus_per_node = gpus
    if args.command == "eval" and args.model:
        cfg.model.path = args.model


def _world_size(cfg, args) -> Optional[int]:
    """The process count the config is checked at (None: not checked)."""
    if args.command == "validate":
        return args.world_size
    if args.command in ("submit", "plan"):
        return cfg.cluster.nodes * max(1, cfg.cluster.gpus_per_node)
    if args.command in ("train", "export"):
        return int(os.environ.get("WORLD_SIZE", "1"))  # its form checked with the arguments
    return None


def _file_problems(cfg, args, wrong: list) -> list:
    """The problems of the files the config names (prompts, model folder, run directory)."""
    if args.command != "eval":
        from megatron_cegppo.preflight import file_problems

        return file_problems(cfg)
    from megatron_cegppo.evaluate import input_problems

    found = input_problems(cfg, args.data)
    if args.data and any(p.startswith("--data ") for p in wrong):
        found = [p for p in found if args.data not in p]  # the same file, named once as --data
    return found


def _architecture(cfg, required: bool):
    """``(arch, error)``: the model's shape, read without the weights. Not ``required``, a
    config that names no architecture and no folder with a config.json gives ``(None, None)``."""
    from pathlib import Path

    if not required and not cfg.model.architecture and not (Path(cfg.model.path) / "config.json").is_file():
        return None, None
    from megatron_cegppo.planner.plan import read_architecture  # imports torch (models/hf_config)

    try:
        return read_architecture(cfg), None
    except (FileNotFoundError, ValueError) as exc:
        return None, str(exc)


def _preflight(cfg, args) -> Optional[int]:
    """Before a GPU job waits in the queue: the memory plan, which also names layout
    problems (when the architecture can be read without the weights). None: submit; else
    the exit status (1: does not fit, 2: an architecture file that cannot be read)."""
    if cfg.cluster.gpus_per_node == 0:
        return None  # CPU clusters
    arch, error = _architecture(cfg, required=False)
    if error:
        print(f"megatron-cegppo: {error}", file=sys.stderr)
        return 2
    if arch is None:
        return None  # nothing to plan from
    from megatron_cegppo.planner import format_plan, make_plan
    from megatron_cegppo.planner.plan import GIB

    plan = make_plan(cfg, arch, impl=_planned_layers(args.layers))
    if not plan.fits and not args.force:
        print(format_plan(plan, title=args.config))
        print("megatron-cegppo: not submitted: the plan above does not fit (--force submits anyway)", file=sys.stderr)
        return 1
    print(f"memory plan: training {plan.training_total / GIB:.1f} GiB, generation {plan.generation_total / GIB:.1f} "
          f"GiB per GPU of {plan.gpu_memory / GIB:.0f}: {'fits' if plan.fits else 'DOES NOT FIT (--force)'}")
    return None


def _shape_problems(cfg, world_size: Optional[int]) -> list:
    """Layout vs the model's shape, when the architecture can be read without the weights."""
    import math

    arch, error = _architecture(cfg, required=False)
    if error:
        return [error]
    if arch is None:
        return []
    from megatron_cegppo.planner.plan import layout_problems

    world = world_size or math.lcm(cfg.parallel.tensor * cfg.parallel.pipeline, cfg.rollout.tensor_parallel)
    return layout_problems(cfg, arch, world)


def _plan(cfg, args) -> int:
    """Prints the memory plan; exit status 0 when it fits, 1 when it does not, 2 on bad input."""
    from megatron_cegppo.planner import format_plan, make_plan

    arch, error = _architecture(cfg, required=True)
    if error:
        print(f"megatron-cegppo: {error}", file=sys.stderr)
        return 2
    plan = make_plan(cfg, arch, impl=_planned_layers(args.layers))
    print(format_plan(plan, title=args.config))
    return 0 if plan.fits else 1


def _planned_layers(choice: str):
    """The planner's layer implementation for ``--layers``, said on stdout: the memory of
    megatron's local layers (no flash attention: s^2 scores) is several times TE's."""
    from megatron_cegppo.planner.activations import MEGATRON_LOCAL, TRANSFORMER_ENGINE
    from megatron_cegppo.platform import importable_layer_implementation

    if choice == "auto":
        choice, reason = importable_layer_implementation()
    else:
        reason = "--layers"
    print(f"planned with {'transformer-engine' if choice == 'transformer_engine' else 'megatron local'} layers "
          f"({reason})")
    return TRANSFORMER_ENGINE if choice == "transformer_engine" else MEGATRON_LOCAL


if __name__ == "__main__":
    sys.exit(main())
