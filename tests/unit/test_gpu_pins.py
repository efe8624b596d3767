"""The GPU pins agree: setup.py's [gpu] extra, scripts/install_gpu.sh, and the CPU pins.

No network, no GPU: parses setup.py and the install script, and runs `bash -n` / `--print-pins`.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "setup.py"
INSTALL = ROOT / "scripts" / "install_gpu.sh"
CHECK = ROOT / "scripts" / "check_gpu_pins.sh"
sys.path.insert(0, str(ROOT / "scripts"))
from setup_requirements import read_setup  # noqa: E402

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _setup_lists():
    consts, install_requires = read_setup(SETUP)
    return consts["GPU"], consts["CPU"], install_requires


def _script_vars():
    out = {}
    for m in re.finditer(r'^([A-Z_]+)="([^"]*)"', INSTALL.read_text(), re.M):
        out.setdefault(m.group(1), m.group(2))
    return out


def _by_name(reqs):
    return {Requirement(r).name.lower().replace("_", "-"): Requirement(r) for r in reqs}


def _exact(req):
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"{req} is not an exact pin"
    return specs[0].version


STACK = {"torch": "TORCH_VERSION", "vllm": "VLLM_VERSION", "megatron-core": "MEGATRON_CORE_VERSION",
         "transformer-engine": "TE_VERSION"}


def test_setup_gpu_extra_pins_equal_install_script():
    gpu, _, _ = _setup_lists()
    v = _script_vars()
    reqs = _by_name(gpu)
    for name, var in STACK.items():
        assert name in reqs, f"setup.py's GPU extra lacks {name}"
        assert _exact(reqs[name]) == v[var], f"{name}: setup.py pins {reqs[name]}, install_gpu.sh {var}={v[var]}"


def test_transformer_engine_extras_match_script_and_cuda_major():
    gpu, _, _ = _setup_lists()
    v = _script_vars()
    te = _by_name(gpu)["transformer-engine"]
    assert te.extras == set(v["TE_EXTRAS"].split(","))
    assert {"pytorch", f"core_cu{v['TORCH_CUDA_MAJOR']}"} <= te.extras


def test_torch_pin_is_what_vllm_pin_requires():
    v = _script_vars()
    assert v["VLLM_REQUIRES_TORCH"], "install_gpu.sh must state vllm's torch requirement"
    assert v["TORCH_VERSION"] == v["VLLM_REQUIRES_TORCH"]
    gpu, _, _ = _setup_lists()
    assert _exact(_by_name(gpu)["torch"]) == v["VLLM_REQUIRES_TORCH"]


def test_megatron_core_gpu_pin_equals_cpu_pin():
    gpu, cpu, _ = _setup_lists()
    assert _exact(_by_name(gpu)["megatron-core"]) == _exact(_by_name(cpu)["megatron-core"])


def test_install_requires_torch_stays_loose():
    _, _, install_requires = _setup_lists()
    torch = _by_name(install_requires)["torch"]
    assert all(s.operator != "==" for s in torch.specifier), f"install_requires pins torch exactly: {torch}"


@needs_bash
@pytest.mark.parametrize("script", [INSTALL, CHECK], ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@needs_bash
def test_print_pins_matches_setup():
    out = subprocess.run(["bash", str(INSTALL), "--print-pins"], check=True, capture_output=True, text=True).stdout
    printed = _by_name(out.split())
    gpu = _by_name(_setup_lists()[0])
    assert set(printed) == set(STACK)
    for name in STACK:
        assert str(printed[name]) == str(gpu[name])
