# Sourced by scripts/demo.sh and scripts/entropy_study.sh: the environment (scripts/install.sh),
# the demo's starting checkpoint and prompt file (made once), one OpenMP thread per process
# (torchrun's default for several processes, which it would announce). Sets ROOT and VENV and
# leaves the shell in ROOT.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
VENV="${CEGPPO_VENV:-$ROOT/.venv}"
"$VENV/bin/python" -m megatron_cegppo.demo.prepare
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
