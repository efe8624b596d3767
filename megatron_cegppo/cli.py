"""``megatron-cegppo``: train and eval. Configs are loaded and validated before torch,
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
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_cegppo.config import ConfigError, load_config, validate

    args = _parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "validate":
            validate(cfg, args.world_size)
            shape = _shape_problems(cfg, args.world_size)
            if shape:
                raise ConfigError("the model's shape does not fit the layout:\n  - " + "\n  - ".join(shape))
            print(f"{args.config}: valid")
            return 0
        if args.command in ("submit", "plan"):
            # the command line overrides the config's cluster section, which the plan reads
            if args.nodes is not None:
                cfg.cluster.nodes = args.nodes
            if getattr(args, "gpus_per_node", None) is not None:
                cfg.cluster.gpus_per_node = args.gpus_per_node
            world = cfg.cluster.nodes * max(1, cfg.cluster.gpus_per_node)
        if args.command == "eval":
            if args.model:
                cfg.model.path = args.model
            cfg.data.train_path = cfg.data.train_path or args.data
        validate(cfg, world if args.command in ("train", "export", "submit", "plan") else None)
    except ConfigError as exc:
        print(f"megatron-cegppo: {exc}", file=sys.stderr)
        return 2
    if args.command == "plan":
        return _plan(cfg, args)
    if args.command == "train":
        from megatron_cegppo.trainer.loop import train

        return 0 if train(cfg) else EXIT_STOPPED
    if args.command == "submit":
        from pathlib import Path

        from megatron_cegppo.slurm import render_sbatch, resolve_signal_seconds, submit

        if not _preflight(cfg, args):
            return 1
        try:
            signal_seconds = resolve_signal_seconds(args.signal_seconds, cfg.trainer.run_dir)
        except ValueError as exc:
            print(f"megatron-cegppo: {exc}", file=sys.stderr)
            return 2
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
    from megatron_cegppo.evaluate import evaluate

    result = evaluate(cfg, args.data, k=args.k)
    print(f"accuracy avg@{args.k}: {result['accuracy']:.4f} over {result['prompts']} prompts")
    return 0


def _architecture(cfg, required: bool):
    """``(arch, error)``: the model's shape, read without the weights. Not ``required``, a
    config that names no architecture and no folder with a config.json gives ``(None, None)``."""
    from pathlib import Path

    from megatron_cegppo.planner.plan import read_architecture

    if not required and not cfg.model.architecture and not (Path(cfg.model.path) / "config.json").is_file():
        return None, None
    try:
        return read_architecture(cfg), None
    except (FileNotFoundError, ValueError) as exc:
        return None, str(exc)


def _preflight(cfg, args) -> bool:
    """Before a GPU job waits in the queue: the memory plan, which also names layout
    problems (when the architecture can be read without the weights)."""
    if cfg.cluster.gpus_per_node == 0:
        return True  # CPU clusters
    arch, error = _architecture(cfg, required=False)
    if error:
        print(f"megatron-cegppo: {error}", file=sys.stderr)
        return False
    if arch is None:
        return True  # nothing to plan from
    from megatron_cegppo.planner import format_plan, make_plan
    from megatron_cegppo.planner.plan import GIB

    plan = make_plan(cfg, arch, impl=_planned_layers(args.layers))
    if not plan.fits and not args.force:
        print(format_plan(plan, title=args.config))
        print("megatron-cegppo: not submitted: the plan above does not fit (--force submits anyway)", file=sys.stderr)
        return False
    print(f"memory plan: training {plan.training_total / GIB:.1f} GiB, generation {plan.generation_total / GIB:.1f} "
          f"GiB per GPU of {plan.gpu_memory / GIB:.0f}: {'fits' if plan.fits else 'DOES NOT FIT (--force)'}")
    return True


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
