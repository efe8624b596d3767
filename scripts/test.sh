#!/usr/bin/env bash
# Sets up the environment (scripts/install.sh) and runs the tests: the fast single-process
# unit tests first, then the real multi-process (gloo) tests, then the Slurm tests on a local
# cluster it starts. Extra arguments go to pytest
# instead (e.g. `bash scripts/test.sh tests/unit -k losses`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
PY="${CEGPPO_VENV:-$ROOT/.venv}/bin/python"
if [ "$#" -gt 0 ]; then
  exec "$PY" -m pytest "$@"
fi
"$PY" -m pytest -q --durations=15 tests/unit
"$PY" -m pytest -q --durations=40 -m distributed tests/distributed
# A real Slurm cluster on this machine (2 fake nodes; installs munge/slurmctld/slurmd as root).
SLURM_CI_NODES=2 bash tests/slurm/local-cluster.sh up
"$PY" -m pytest -q --durations=10 -m slurm tests/slurm
