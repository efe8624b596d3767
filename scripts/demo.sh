#!/usr/bin/env bash
# Sets up the environment (scripts/install.sh) and runs the CPU demo: CE-GPPO updates of a
# tiny GPTModel at TP=2 x PP=2 (4 processes, gloo). Extra arguments go to launch/loss_demo.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
VENV="${CEGPPO_VENV:-$ROOT/.venv}"
exec "$VENV/bin/torchrun" --nproc-per-node 4 launch/loss_demo.py --tp 2 --pp 2 "$@"
