#!/usr/bin/env bash
# The entropy study of docs/entropy_study.md: 9 settings x 3 seeds of the CPU task (the demo's
# config, 200 steps a run), one run after another; started again, it skips the finished runs and
# resumes the unfinished one. Extra arguments go to the sweep (e.g. --summary-only). The
# controller runs at its first defaults, which this study measured (the present ones differ).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/demo_env.sh"
exec "$VENV/bin/python" -m megatron_cegppo.cli sweep --config configs/tiny_cpu.yaml --out runs/entropy_study \
  --nproc 2 --seeds 0,1,2 \
  --setting "ppo_clip algorithm.beta1=0 algorithm.beta2=0" \
  --setting "dapo_clip_higher algorithm.beta1=0 algorithm.beta2=0 algorithm.eps_high=0.28" \
  --setting "gppo_1_1 algorithm.beta1=1 algorithm.beta2=1" \
  --setting "cegppo_0.5_1 algorithm.beta1=0.5 algorithm.beta2=1" \
  --setting "cegppo_0.75_1 algorithm.beta1=0.75 algorithm.beta2=1" \
  --setting "cegppo_0.25_1 algorithm.beta1=0.25 algorithm.beta2=1" \
  --setting "cegppo_0.5_0.5 algorithm.beta1=0.5 algorithm.beta2=0.5" \
  --setting "cegppo_0.5_1.5 algorithm.beta1=0.5 algorithm.beta2=1.5" \
  --setting "control_0.8 algorithm.beta1=0.5 algorithm.beta2=1 algorithm.entropy_control.enabled=true algorithm.entropy_control.target_fraction=0.8 algorithm.entropy_control.warmup_steps=10 algorithm.entropy_control.ki=0.2 algorithm.entropy_control.smoothing=0 algorithm.entropy_control.wait_for_band=false algorithm.entropy_control.beta1_min=0.05 algorithm.entropy_control.beta1_max=2 algorithm.entropy_control.beta2_min=0.05 algorithm.entropy_control.beta2_max=2" \
  trainer.steps=200 trainer.save_every=50 "$@"
