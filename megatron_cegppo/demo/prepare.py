"""Everything a CPU task needs, made once: the warmed-up tiny model (supervised warm-up
until it answers some but not all problems) and the RL prompt file. Defaults: the demo's
2-digit task; ``--digits 3 --written-steps`` with their own paths: the entropy study's."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_cegppo.rewards.synthetic import make_arithmetic_dataset


def write_prompts(path: Path, n: int, seed: int, digits: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in make_arithmetic_dataset(n, seed, digits=digits):
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", default="checkpoints/tiny_qwen2_warmup")
    p.add_argument("--prompts", default="data/arithmetic_train.jsonl")
    p.add_argument("--num-prompts", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--digits", type=int, default=2, help="operand width")
    p.add_argument("--written-steps", action="store_true",
                   help="warm up on the column working before the answer (a longer response)")
    args = p.parse_args(argv)
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "warmup.json").exists():
        from megatron_cegppo.demo.warmup import main as warmup_main

        print(f"[prepare] supervised warm-up -> {checkpoint}", flush=True)
        warmup_main(["--out", str(checkpoint), "--seed", str(args.seed), "--digits", str(args.digits)]
                    + (["--written-steps"] if args.written_steps else []))
    else:
        print(f"[prepare] warm-up checkpoint present: {checkpoint}", flush=True)
    prompts = Path(args.prompts)
    if not prompts.exists():
        # a different seed from the warm-up's problems: the RL prompts are new to the model
        write_prompts(prompts, args.num_prompts, seed=10_000 + args.seed, digits=args.digits)
        print(f"[prepare] wrote {args.num_prompts} prompts -> {prompts}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
