#!/usr/bin/env bash
# The actor check (benchmarks/gpu_check.py --engine replay): the real Trainer for 3 steps on one
# GPU with generation replayed from a recording, then the fused log-prob timing. Needs torch
# with CUDA, transformers, safetensors and megatron-core (no vLLM, no transformer-engine).
# PYTHON picks the interpreter; arguments go to the script (e.g. --device cpu --skip-timing).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$root/benchmarks/gpu_check.py" --engine replay "$@"
