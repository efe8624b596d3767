#!/usr/bin/env bash
# The full check of a GPU node (benchmarks/gpu_check.py --engine vllm): the same 3 steps with
# vLLM generating on the GPU, sleep and wake around training, the weight push, the mismatch at
# every step and the logits after a push of unchanged weights. Run it after
# scripts/install_gpu.sh, with that environment's python (PYTHON=.venv-gpu/bin/python).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$root/benchmarks/gpu_check.py" --engine vllm "$@"
