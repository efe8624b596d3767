"""The requirement lists of setup.py, read without running it (no install, no network): its
module-level constants (the CPU and GPU extras) and ``install_requires``. Shared by
scripts/check_gpu_pins.sh and the pin tests."""

from __future__ import annotations

import ast
from pathlib import Path


def read_setup(setup_py: str | Path) -> tuple[dict, list]:
    """``(constants, install_requires)``: every module-level name assigned a literal, and the
    ``install_requires`` keyword's list."""
    tree = ast.parse(Path(setup_py).read_text())
    consts, install_requires = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                consts[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            install_requires = ast.literal_eval(node.value)
    return consts, install_requires
