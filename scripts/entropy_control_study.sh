#!/usr/bin/env bash
# The controller study of docs/entropy_study.md ("The longer-answer task"): fixed betas against
# the entropy-target controller on 3-digit addition with the column working written out
# (configs/tiny_cpu_written3.yaml, 150 steps a run), 5 settings x 3 seeds, one run after
# another; started again, it skips the finished runs and resumes the unfinished one. Extra
# arguments go to the sweep (e.g. --summary-only).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/demo_env.sh"
"$VENV/bin/python" -m megatron_cegppo.demo.prepare --digits 3 --written-steps \
  --checkpoint checkpoints/tiny_qwen2_written3 --prompts data/arithmetic3_train.jsonl
exec "$VENV/bin/python" -m megatron_cegppo.cli sweep --config configs/tiny_cpu_written3.yaml \
  --out runs/entropy_control_study --nproc 2 --seeds 0,1,2 \
  --setting "ppo_clip algorithm.beta1=0 algorithm.beta2=0" \
  --setting "cegppo_0.5_1 algorithm.beta1=0.5 algorithm.beta2=1" \
  --setting "cegppo_0.25_2 algorithm.beta1=0.25 algorithm.beta2=2" \
  --setting "control_0.8 algorithm.beta1=0.5 algorithm.beta2=1 algorithm.entropy_control.enabled=true algorithm.entropy_control.target_fraction=0.8 algorithm.entropy_control.warmup_steps=10" \
  --setting "control_0.5 algorithm.beta1=0.5 algorithm.beta2=1 algorithm.entropy_control.enabled=true algorithm.entropy_control.target_fraction=0.5 algorithm.entropy_control.warmup_steps=10" \
  trainer.save_every=50 "$@"
