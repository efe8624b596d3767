#!/usr/bin/env bash
# Sets up the environment (scripts/install.sh) and runs the tests: the fast single-process
# unit tests first, then the real multi-process (gloo) tests. Extra arguments go to pytest
# instead (e.g. `bash scripts/test.sh tests/unit -k losses`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
PY="${CEGPPO_VENV:-$ROOT/.venv}/bin/python"
if [ "$#" -gt 0 ]; then
  exec "$PY" -m pytest "$@"
fi
"$PY" -m pytest -q tests/unit
"$PY" -m pytest -q -m distributed tests/distributed
