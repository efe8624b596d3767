"""Checkpoint directories that are either complete or ignored.

A checkpoint is written into a staging directory, every file is made durable, a manifest of
every file and its size is written last, and only then is the directory renamed to
``step_NNNNNNNN``; the ``latest`` pointer is replaced after that. A run killed at any moment
leaves either the previous checkpoint as ``latest`` or the new one complete. Loading checks
the manifest (a truncated or missing file is detected) and falls back to the newest complete
checkpoint with a warning. megatron-core's ``dist_checkpointing`` alone is not atomic (its rank
files are written under their final names and ``metadata.json`` with a plain write).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional

from megatron_cegppo.tracking.run_dir import atomic_write_text, fsync_dir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointStore:
    """The ``checkpoints/`` folder of a run. Rank 0 calls :meth:`commit` once every rank has
    finished writing into :meth:`staging_dir`."""

    def __init__(self, root: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def staging_dir(self, step: int) -> Path:
        return self.root / f".staging-{step_dir_name(step)}"

    def clean_staging(self) -> None:
        """Removes what a killed save left (call on rank 0 before any rank writes)."""
        if self.root.exists():
            for path in self.root.glob(".staging-*"):
                shutil.rmtree(path, ignore_errors=True)

    def commit(self, step: int) -> Path:
        staging = self.staging_dir(step)
        if not staging.is_dir():
            raise CheckpointError(f"nothing staged for step {step} in {staging}")
        files = {}
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[str(path.relative_to(staging))] = path.stat().st_size
        for directory in sorted({p.parent for p in staging.rglob("*")} | {staging}):
            fsync_dir(directory)
        atomic_write_text(staging / MANIFEST, json.dumps(
            {"format_version": FORMAT_VERSION, "step": step, "files": files}, indent=1))
        final = self.root / step_dir_name(step)
        if final.exists():  # the same step saved again (e.g. on a stop signal): replace it
            shutil.rmtree(final)
        os.rename(staging, final)
        fsync_dir(self.root)
        atomic_write_text(self.root / LATEST, step_dir_name(step) + "\n")
        self._prune()
        return final

    def _prune(self) -> None:
        complete = [path for _, path in self._listed()]
        for path in complete[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)

    def _listed(self) -> list[tuple[int, Path]]:
        if not self.root.exists():
            return []
        out = []
        for path in self.root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and path.is_dir():
                out.append((int(match.group(1)), path))
        return sorted(out)

    @staticmethod
    def verify(path: Path) -> dict:
        """The manifest of a complete checkpoint; :class:`CheckpointError` otherwise."""
        manifest_path = path / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no {MANIFEST} (the save did not finish)") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable {MANIFEST}: {exc}") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: format version {manifest.get('format_version')}, "
                                  f"this code reads {FORMAT_VERSION}")
        for name, size in manifest.get("files", {}).items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{path}: {name} is missing")
            if file.stat().st_size != size:
                raise CheckpointError(f"{path}: {name} has {file.stat().st_size} bytes, the manifest says {size}")
        return manifest

    def latest(self) -> Optional[Path]:
        """The checkpoint to resume from: the one ``latest`` names if it is complete, else the
        newest complete one (with a warning); ``None`` when there is none."""
        pointer = self.root / LATEST
        named = None
        if pointer.exists():
            named = self.root / pointer.read_text().strip()
            try:
                self.verify(named)
                return named
            except CheckpointError as exc:
                warnings.warn(f"latest checkpoint unusable ({exc}); looking for an older one")
        for _, path in reversed(self._listed()):
            if path == named:
                continue
            try:
                self.verify(path)
            except CheckpointError as exc:
                warnings.warn(f"skipping checkpoint: {exc}")
                continue
            if named is not None:
                warnings.warn(f"resuming from {path.name} instead")
            return path
        return None
