"""What the package reads at run time ships with it: a wheel built from the checkout, installed
into a folder of its own and used from another working directory, renders the batch script
and loads the demo's config; the copies kept at the top level for reading equal the shipped
files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
PACKAGE = "megatron_cegppo"
# what setup.py needs to build (it reads README.md for the long description)
BUILD_INPUTS = ("setup.py", "README.md", "pyproject.toml", "setup.cfg", "MANIFEST.in")
# top-level copies, for reading, of files the package ships
COPIES = {"slurm/cegppo.sbatch": "megatron_cegppo/templates/cegppo.sbatch",
          "configs/tiny_cpu.yaml": "megatron_cegppo/testing/tiny_cpu.yaml"}


@pytest.mark.parametrize("copy", sorted(COPIES))
def test_top_level_copy_equals_the_shipped_file(copy):
    assert (CHECKOUT / copy).read_bytes() == (CHECKOUT / COPIES[copy]).read_bytes(), (
        f"{copy} differs from {COPIES[copy]}: change both (the package reads the second)")


def _package_files() -> set[str]:
    return {p.relative_to(CHECKOUT).as_posix() for p in (CHECKOUT / PACKAGE).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """``(wheel, target)``: a wheel built from a copy of the checkout (a build writes build/
    and *.egg-info beside its sources) and the folder it is installed into."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (CHECKOUT / name).exists():
            shutil.copy2(CHECKOUT / name, source / name)
    shutil.copytree(CHECKOUT / PACKAGE, source / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    env = {**os.environ, "PIP_NO_INDEX": "1"}  # offline: nothing but the sources is needed
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)],
                   check=True, env=env, cwd=root)
    (wheel,) = (root / "dist").glob("*.whl")
    target = root / "target"
    subprocess.run(pip + ["install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
                   check=True, env=env, cwd=root)
    return wheel, target


def test_wheel_holds_every_file_of_the_package(installed):
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.startswith(f"{PACKAGE}/")}
    assert _package_files() - shipped == set()


_USE = """
import json, sys
import megatron_cegppo
from megatron_cegppo.config import validate
from megatron_cegppo.slurm import render_sbatch
from megatron_cegppo.testing.tiny import load_tiny_config

script = render_sbatch(config="job.yaml", overrides=["trainer.seed=1"], run_dir="run", nodes=2,
                       gpus_per_node=8, time="1:00:00")
cfg = validate(load_tiny_config(["trainer.steps=3"]), 2)
print(json.dumps({"package": megatron_cegppo.__file__, "script": script, "steps": cfg.trainer.steps,
                  "tensor": cfg.parallel.tensor}))
"""


def test_installed_wheel_works_from_another_directory(installed, tmp_path):
    _, target = installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # -S: the venv's .pth files stay unread (the editable install's finder maps the package to
    # the checkout); its site-packages is still on the path for the dependencies
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])
    out = subprocess.run([sys.executable, "-S", "-c", _USE], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(result["package"]).is_relative_to(target)
    script = result["script"]
    assert "#SBATCH --nodes=2" in script and "@@" not in script.replace("USR1@", "")
    assert "OVERRIDES=(trainer.seed=1)" in script and f"CONFIG={elsewhere / 'job.yaml'}" in script
    assert (result["steps"], result["tensor"]) == (3, 2)
