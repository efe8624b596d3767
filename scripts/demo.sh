#!/usr/bin/env bash
# Sets up the environment (scripts/install.sh) and runs the CPU demo: CE-GPPO training of a
# tiny Qwen2-shaped model on 2-digit addition, 2 processes (training TP=2, one vLLM engine per
# process). The first run also makes the starting checkpoint (a ~30 s supervised warm-up) and
# the prompt file. Extra arguments are config overrides, e.g. `trainer.seed=1`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/demo_env.sh"
exec "$VENV/bin/torchrun" --nproc-per-node 2 -m megatron_cegppo.cli train --config configs/tiny_cpu.yaml "$@"
