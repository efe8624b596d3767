#!/usr/bin/env bash
# Installs the GPU stack of megatron-cegppo at exact, mutually consistent versions:
#   torch 2.14.0 (CUDA 13.0 build), vllm 0.33.0, megatron-core 0.16.1,
#   transformer-engine 2.20.2 (core wheel for CUDA 13 + its torch extension), and the package.
#
# Usage:
#   bash scripts/install_gpu.sh              # venv at .venv-gpu (or $CEGPPO_VENV)
#   bash scripts/install_gpu.sh --system     # into the current interpreter (e.g. an NVIDIA container)
#   bash scripts/install_gpu.sh --check      # only the import check of an existing install
#   bash scripts/install_gpu.sh --print-pins # the pinned requirements, one per line
#
# Requirements
#   - Linux x86_64, NVIDIA driver R580 or newer: torch 2.14.0 on PyPI is a CUDA 13.0 build, and
#     CUDA 13.x needs an R580+ driver. An older driver installs fine but
#     torch.cuda.is_available() is False.
#   - Python 3.11 or 3.12 (vllm 0.33.0 needs >= 3.11; megatron-core 0.16.1, the version the CPU
#     path tests, is kept for the GPU pins too). Set PYTHON to choose the interpreter for the venv.
#   - For the transformer-engine torch extension (an sdist, built with --no-build-isolation against
#     the installed torch, as TE's README says): a C++17 compiler, a CUDA 13 toolkit (nvcc; found
#     through CUDA_HOME, PATH or /usr/local/cuda) and cuDNN headers (the nvidia-cudnn-cu13 wheel that
#     torch pulls in carries them; CUDNN_PATH is pointed at it unless set). TE's setup first tries
#     a prebuilt wheel from its GitHub release and compiles only when none matches. To build with
#     the CUDA pip wheels instead of a toolkit, set NVTE_BUILD_USE_NVIDIA_WHEELS=1 (TE's own switch;
#     not tried here). NVTE_CUDA_ARCHS="90" (H100/H200 only) and MAX_JOBS shorten the build.
#
# NVIDIA PyTorch containers (nvcr.io/nvidia/pytorch:YY.MM-py3)
#   vllm 0.33.0 requires torch==2.14.0 exactly. The containers' torch is a source build with a
#   pre-release version such as "2.10.0a0+b4e4ee81d3" (release 25.12), which never equals 2.14.0,
#   so vllm would replace the container's torch (and the container's pip constraint file,
#   /etc/pip/constraint.txt, pins its own torch). Therefore:
#     * default (venv) mode inside a container: a separate venv with torch 2.14.0 from PyPI;
#       the container's Python packages are left untouched. A PIP_CONSTRAINT variable that names
#       the container's constraint file is not applied to the venv (it describes the container's
#       packages, not the venv's).
#     * --system: installs into the container's Python only when its torch already is 2.14.0
#       (a local label such as +cu130 is accepted); otherwise it refuses and changes nothing.
#   See docs/gpu_install.md.
#
# apex is optional (not on PyPI; build it from source if wanted): megatron-core falls back to
# torch's fused Adam without it. This script removes nothing; it reports apex if present.
set -euo pipefail

# ---- the pins: one place. setup.py's GPU extra must list the same versions
# ---- (tests/unit/test_gpu_pins.py checks it).
TORCH_VERSION="2.14.0"
VLLM_VERSION="0.33.0"
# vllm 0.33.0's own metadata: Requires-Dist torch==2.14.0 (and torchvision==0.29.0,
# torchaudio==2.11.0, which pip takes from vllm). TORCH_VERSION must equal this.
VLLM_REQUIRES_TORCH="2.14.0"
MEGATRON_CORE_VERSION="0.16.1"
TE_VERSION="2.20.2"
TE_EXTRAS="core_cu13,pytorch"
TORCH_CUDA_MAJOR="13"       # torch 2.14.0 on PyPI is built with CUDA 13.0
MIN_DRIVER_MAJOR="580"      # CUDA 13.x needs an R580+ driver
PYTHON_OK="3.11 3.12"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=venv
ONLY_CHECK=0
for arg in "$@"; do
  case "$arg" in
    --system) MODE=system ;;
    --check) ONLY_CHECK=1 ;;
    --print-pins)
      printf '%s\n' "torch==$TORCH_VERSION" "vllm==$VLLM_VERSION" "megatron-core==$MEGATRON_CORE_VERSION" \
        "transformer-engine[$TE_EXTRAS]==$TE_VERSION"
      exit 0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "[install_gpu] unknown option: $arg (see --help)" >&2; exit 2 ;;
  esac
done

STEP="start"
DIED=0
CONSTRAINTS=""
die() { DIED=1; echo "[install_gpu] FAILED ($STEP): $*" >&2; exit 1; }
on_exit() {
  local rc=$?
  [ -n "$CONSTRAINTS" ] && rm -f "$CONSTRAINTS"
  if [ "$rc" -ne 0 ] && [ "$DIED" = 0 ]; then
    echo "[install_gpu] FAILED at step: $STEP (exit $rc); the output above says why" >&2
  fi
}
trap on_exit EXIT
log() { echo "[install_gpu] $*"; }

[ "$TORCH_VERSION" = "$VLLM_REQUIRES_TORCH" ] || die "pins disagree: torch $TORCH_VERSION but vllm $VLLM_VERSION requires torch==$VLLM_REQUIRES_TORCH"

# ---- interpreter / environment
STEP="python"
if [ "$MODE" = system ]; then
  PY="${PYTHON:-python3}"
  command -v "$PY" >/dev/null 2>&1 || die "no interpreter '$PY'"
  PY="$(command -v "$PY")"
else
  VENV="${CEGPPO_VENV:-$ROOT/.venv-gpu}"
  [ "$ONLY_CHECK" = 1 ] && [ ! -x "$VENV/bin/python" ] && die "no venv at $VENV to check (set CEGPPO_VENV, or use --system --check)"
  if [ -x "$VENV/bin/python" ]; then
    BASE_PY="$VENV/bin/python"
  else
    BASE_PY="${PYTHON:-}"
    if [ -z "$BASE_PY" ]; then
      for c in python3.12 python3.11 python3; do "$c" -c '' >/dev/null 2>&1 && { BASE_PY="$c"; break; }; done
    fi
    [ -n "$BASE_PY" ] || die "no python3 found; set PYTHON"
  fi
  PY="$BASE_PY"
fi
PYVER="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || die "cannot run $PY"
case " $PYTHON_OK " in *" $PYVER "*) ;; *) die "Python $PYVER: the GPU pins need Python 3.11 or 3.12 (vllm $VLLM_VERSION needs >= 3.11; megatron-core $MEGATRON_CORE_VERSION is kept for the GPU path)" ;; esac
[ "$(uname -s)/$(uname -m)" = "Linux/x86_64" ] || log "warning: tested pins are for Linux x86_64; this is $(uname -s)/$(uname -m)"

if [ "$MODE" = venv ] && [ ! -x "$VENV/bin/python" ]; then
  STEP="create venv"
  log "creating $VENV with $PY (Python $PYVER)"
  "$PY" -m venv "$VENV" || die "python -m venv failed (on Debian/Ubuntu: apt-get install python$PYVER-venv)"
fi
[ "$MODE" = venv ] && PY="$VENV/bin/python"

# Inside an NVIDIA container PIP_CONSTRAINT may name the container's constraint file (it pins the
# container's own torch); it describes the container's packages, so the venv does not use it.
if [ "$MODE" = venv ] && [ -n "${NVIDIA_PYTORCH_VERSION:-}" ]; then
  case "${PIP_CONSTRAINT:-}" in
    */etc/pip/constraint.txt*)
      log "not applying PIP_CONSTRAINT=$PIP_CONSTRAINT (the container's) to the venv"
      unset PIP_CONSTRAINT ;;
  esac
fi

PIP=("$PY" -m pip --disable-pip-version-check)
CONSTRAINTS="$(mktemp "${TMPDIR:-/tmp}/cegppo-gpu-constraints.XXXXXX")"
# Every pip call below runs under these, so nothing can move torch or the stack off the pins.
printf '%s\n' "torch==$TORCH_VERSION" "vllm==$VLLM_VERSION" "megatron-core==$MEGATRON_CORE_VERSION" \
  "transformer-engine==$TE_VERSION" "transformer-engine-cu$TORCH_CUDA_MAJOR==$TE_VERSION" \
  "transformer-engine-torch==$TE_VERSION" >"$CONSTRAINTS"

installed_version() {  # prints the installed version of a distribution, or nothing
  "$PY" - "$1" <<'PY' 2>/dev/null || true
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
PY
}
base_version() { echo "${1%%+*}"; }   # 2.14.0+cu130 -> 2.14.0

# ---- the import check (also the end of a full install)
import_check() {
  STEP="import check"
  log "import check"
  local out
  if ! out="$(TORCH_PIN="$TORCH_VERSION" VLLM_PIN="$VLLM_VERSION" MCORE_PIN="$MEGATRON_CORE_VERSION" \
      TE_PIN="$TE_VERSION" CUDA_MAJOR="$TORCH_CUDA_MAJOR" "$PY" - <<'PY' 2>&1
import os, sys, shutil, warnings
warnings.simplefilter("ignore")  # megatron's "TE/Apex not installed" notices; failures are listed below
failed = []
def fail(what):
    failed.append(what)
    print(f"  FAIL {what}")

try:
    import torch
    base = torch.__version__.split("+")[0]
    print(f"  torch {torch.__version__} (CUDA build {torch.version.cuda}); "
          f"cuda available: {torch.cuda.is_available()}; devices: {torch.cuda.device_count()}"
          + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    if base != os.environ["TORCH_PIN"]:
        fail(f"torch is {torch.__version__}, pinned {os.environ['TORCH_PIN']}")
    if not (torch.version.cuda or "").startswith(os.environ["CUDA_MAJOR"] + "."):
        fail(f"torch is not a CUDA {os.environ['CUDA_MAJOR']} build (torch.version.cuda={torch.version.cuda})")
    if not torch.cuda.is_available():
        print("  note: no usable GPU here (needs an NVIDIA driver R580+ for CUDA 13); "
              "rerun `bash scripts/install_gpu.sh --check` on a GPU node")
except Exception as e:
    fail(f"import torch: {e!r}")

try:
    import vllm
    print(f"  vllm {vllm.__version__}")
    if vllm.__version__.split("+")[0] != os.environ["VLLM_PIN"]:
        fail(f"vllm is {vllm.__version__}, pinned {os.environ['VLLM_PIN']}")
except Exception as e:
    fail(f"import vllm: {e!r}")

try:
    import megatron.core
    print(f"  megatron-core {megatron.core.__version__}")
    if megatron.core.__version__ != os.environ["MCORE_PIN"]:
        fail(f"megatron-core is {megatron.core.__version__}, pinned {os.environ['MCORE_PIN']}")
except Exception as e:
    fail(f"import megatron.core: {e!r}")

try:
    import transformer_engine
    import transformer_engine.pytorch  # noqa: F401  (loads the torch extension)
    import transformer_engine_torch  # noqa: F401
    from importlib import metadata
    te_versions = {d: metadata.version(d) for d in
                   ("transformer-engine", f"transformer-engine-cu{os.environ['CUDA_MAJOR']}", "transformer-engine-torch")}
    print("  " + ", ".join(f"{k} {v}" for k, v in te_versions.items()))
    for k, v in te_versions.items():
        if v.split("+")[0] != os.environ["TE_PIN"]:
            fail(f"{k} is {v}, pinned {os.environ['TE_PIN']}")
except Exception as e:
    missing = isinstance(e, ModuleNotFoundError) and (e.name or "").startswith("transformer_engine")
    hint = "" if missing or shutil.which("nvidia-smi") else \
        " (no NVIDIA driver here: TE's libraries need libcuda; rerun --check on a GPU node)"
    fail(f"import transformer_engine.pytorch: {e!r}{hint}")

try:
    from megatron.core.models.gpt import gpt_layer_specs
    print(f"  megatron gpt_layer_specs.HAVE_TE = {gpt_layer_specs.HAVE_TE}")
    if not gpt_layer_specs.HAVE_TE:
        fail("megatron.core.models.gpt.gpt_layer_specs.HAVE_TE is False (megatron cannot use transformer-engine)")
except Exception as e:
    fail(f"import megatron.core.models.gpt.gpt_layer_specs: {e!r}")

try:
    import apex  # noqa: F401
    print(f"  apex: present ({getattr(apex, '__file__', '?')})")
except Exception:
    print("  apex: not installed (optional)")

try:
    import megatron_cegppo
    print(f"  megatron_cegppo from {os.path.dirname(megatron_cegppo.__file__)}")
except Exception as e:
    fail(f"import megatron_cegppo: {e!r}")

if failed:
    print("IMPORT-CHECK-FAILED: " + "; ".join(failed))
    sys.exit(1)
PY
  )"; then
    echo "$out"
    die "$(echo "$out" | sed -n 's/^IMPORT-CHECK-FAILED: //p')"
  fi
  echo "$out"
  log "ok: torch $TORCH_VERSION, vllm $VLLM_VERSION, megatron-core $MEGATRON_CORE_VERSION, transformer-engine $TE_VERSION ($PY)"
}

if [ "$ONLY_CHECK" = 1 ]; then import_check; exit 0; fi

# ---- driver (a GPU-less login node may install; the import check says what it could not test)
STEP="driver"
if command -v nvidia-smi >/dev/null 2>&1; then
  drv="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 || true)"
  if [ -n "$drv" ]; then
    [ "${drv%%.*}" -ge "$MIN_DRIVER_MAJOR" ] 2>/dev/null \
      || die "NVIDIA driver $drv is older than R$MIN_DRIVER_MAJOR, which CUDA 13 (torch $TORCH_VERSION from PyPI) needs"
    log "NVIDIA driver $drv"
  fi
else
  log "note: nvidia-smi not found; installing anyway (no GPU checks possible here)"
fi

# ---- torch
STEP="torch"
have_torch="$(installed_version torch)"
if [ "$MODE" = system ]; then
  if [ -n "$have_torch" ] && [ "$(base_version "$have_torch")" != "$TORCH_VERSION" ]; then
    die "this environment has torch $have_torch; vllm $VLLM_VERSION requires torch==$VLLM_REQUIRES_TORCH exactly, so installing would replace it. Refusing to touch it: run without --system to get a separate venv (see docs/gpu_install.md)"
  fi
  [ -n "$have_torch" ] && log "keeping the installed torch $have_torch"
fi
if [ "$MODE" = venv ]; then
  "${PIP[@]}" install -q --upgrade pip "setuptools>=77.0.3" wheel || die "upgrading pip/setuptools/wheel failed"
else
  # the container's own pip/setuptools stay; only add what a --no-build-isolation build needs
  "$PY" -c 'import setuptools, wheel' 2>/dev/null || "${PIP[@]}" install -q setuptools wheel \
    || die "setuptools/wheel (needed to build transformer-engine's torch extension) could not be installed"
fi
if [ "$(base_version "$have_torch")" != "$TORCH_VERSION" ]; then
  log "torch $TORCH_VERSION (CUDA $TORCH_CUDA_MAJOR build from PyPI)"
  "${PIP[@]}" install -c "$CONSTRAINTS" "torch==$TORCH_VERSION" || die "pip could not install torch==$TORCH_VERSION"
fi
cuda_of_torch="$("$PY" -c 'import torch; print(torch.version.cuda or "")')" || die "installed torch does not import"
[ "${cuda_of_torch%%.*}" = "$TORCH_CUDA_MAJOR" ] \
  || die "torch $("$PY" -c 'import torch; print(torch.__version__)') is not a CUDA $TORCH_CUDA_MAJOR build (torch.version.cuda='$cuda_of_torch'); a CPU or other-CUDA wheel came from a local wheel folder or another index"

# ---- vllm, megatron-core, and TE's build tools (torch stays: it is pinned in the constraints)
STEP="vllm + megatron-core"
log "vllm $VLLM_VERSION, megatron-core $MEGATRON_CORE_VERSION"
"${PIP[@]}" install -c "$CONSTRAINTS" "torch==$TORCH_VERSION" "vllm==$VLLM_VERSION" \
  "megatron-core==$MEGATRON_CORE_VERSION" psutil cmake ninja "pybind11>=2.6" "nvidia-cudnn-frontend>=1.29.0" \
  || die "pip could not install vllm==$VLLM_VERSION / megatron-core==$MEGATRON_CORE_VERSION next to torch==$TORCH_VERSION (a pip constraint file pinning another torch causes this: check 'pip config list' and PIP_CONSTRAINT)"

# ---- transformer-engine: core wheel for CUDA 13 + the torch extension built against this torch
STEP="transformer-engine"
have_te="$(installed_version transformer-engine-torch)"
if [ "$(base_version "$have_te")" = "$TE_VERSION" ] && [ "$(base_version "$(installed_version transformer-engine-cu$TORCH_CUDA_MAJOR)")" = "$TE_VERSION" ]; then
  log "transformer-engine $TE_VERSION already installed"
else
  site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  if [ "${NVTE_BUILD_USE_NVIDIA_WHEELS:-0}" != 1 ]; then
    nvcc=""
    for c in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "$(command -v nvcc 2>/dev/null || true)" /usr/local/cuda/bin/nvcc; do
      [ -n "$c" ] && [ -x "$c" ] && { nvcc="$c"; break; }
    done
    [ -n "$nvcc" ] || die "no nvcc (CUDA $TORCH_CUDA_MAJOR toolkit) found via CUDA_HOME, PATH or /usr/local/cuda: it is needed to build transformer-engine's torch extension (or set NVTE_BUILD_USE_NVIDIA_WHEELS=1 to use the CUDA pip wheels)"
    nvcc_ver="$("$nvcc" --version | sed -n 's/.*release \([0-9][0-9]*\)\.\([0-9]*\).*/\1.\2/p')"
    [ "${nvcc_ver%%.*}" = "$TORCH_CUDA_MAJOR" ] \
      || die "$nvcc is CUDA $nvcc_ver; torch $TORCH_VERSION is a CUDA $TORCH_CUDA_MAJOR build: point CUDA_HOME at a CUDA $TORCH_CUDA_MAJOR toolkit"
    export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$nvcc")")}"
    log "CUDA toolkit $nvcc_ver at $CUDA_HOME"
  fi
  if [ -z "${CUDNN_PATH:-}" ] && [ -f "$site/nvidia/cudnn/include/cudnn.h" ]; then
    # Build against the cuDNN that torch loads (TE's README: avoids CUDNN_STATUS_SUBLIBRARY_LOADING_FAILED).
    export CUDNN_PATH="$site/nvidia/cudnn" CUDNN_HOME="$site/nvidia/cudnn"
  fi
  if [ -n "${CUDNN_PATH:-}" ]; then
    [ -f "$CUDNN_PATH/include/cudnn.h" ] || die "CUDNN_PATH=$CUDNN_PATH has no include/cudnn.h"
    log "cuDNN headers from $CUDNN_PATH"
  elif [ ! -f /usr/include/cudnn.h ] && [ ! -f "${CUDA_HOME:-/nonexistent}/include/cudnn.h" ]; then
    die "no cuDNN headers (cudnn.h) found: set CUDNN_PATH to a cuDNN 9 installation"
  fi
  export NVTE_FRAMEWORK=pytorch
  log "transformer-engine[$TE_EXTRAS] $TE_VERSION (torch extension: --no-build-isolation against torch $TORCH_VERSION; a compile takes a while)"
  "${PIP[@]}" install --no-build-isolation -c "$CONSTRAINTS" "torch==$TORCH_VERSION" \
    "transformer-engine[$TE_EXTRAS]==$TE_VERSION" \
    || die "transformer-engine $TE_VERSION did not install (its torch extension is built from source here: see the compiler output above; TE's README lists CUDA_PATH, CUDNN_PATH, CXX, MAX_JOBS)"
fi

# ---- the package (everything already pinned above is satisfied; torch is not re-resolved)
STEP="megatron-cegppo"
log "megatron-cegppo[gpu] (editable)"
"${PIP[@]}" install --no-build-isolation -c "$CONSTRAINTS" -e "$ROOT[gpu]" \
  || die "pip install -e .[gpu] failed"
# report only: the container/venv may hold packages with their own complaints
"${PIP[@]}" check 2>&1 | sed 's/^/[install_gpu] pip check: /' || true

import_check
