#!/usr/bin/env bash
# Runs benchmarks/gpu_smoke.py with the checkout on PYTHONPATH (no install needed).
# PYTHON picks the interpreter (default python3); arguments go to the script, e.g.
#   bash benchmarks/gpu_smoke.sh                    # CUDA: results in benchmarks/results/
#   bash benchmarks/gpu_smoke.sh --device cpu --shape-tokens 256 --shape-hidden 64 --shape-vocab 512
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$root/benchmarks/gpu_smoke.py" "$@"
