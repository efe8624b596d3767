"""Checkpoint directories that are either complete or ignored.

A checkpoint is written into a staging directory, every file is made durable, a manifest of
every file, its size and a digest of its contents is written last, and only then is the
directory renamed to ``step_NNNNNNNN``; the ``latest`` pointer is replaced after that. A run
killed at any moment leaves either the previous checkpoint as ``latest`` or the new one
complete. Loading checks the manifest (a truncated, missing or altered file is detected, the
file named) and falls back to the newest checkpoint that verifies, with a warning. Pruning
counts only checkpoints that verify, so a damaged newer one never pushes out the newest good
one. megatron-core's ``dist_checkpointing`` alone is not atomic (its rank files are written
under their final names and ``metadata.json`` with a plain write).

Digests: SHA-256 (``hashlib``), streamed in 8 MiB chunks. With the CPU's SHA extensions it
is the fastest stdlib hash measured here (``benchmarks/checkpoint_digest.py``): about 1.2-1.5
GB/s on one core, i.e. ~0.7-0.85 s per GB, ahead of blake2b (~0.9-1.1 s/GB) and md5 (~1.3
s/GB); a 500 GB checkpoint is ~6-7 core-minutes. Hashing is split across ranks at save time
(:meth:`CheckpointStore.digest_share` + ``commit(step, digests=...)``) and across threads
within a process (``hashlib`` releases the GIL on large updates).

Manifests of format version 1 (sizes only, written before digests existed) are still
accepted: their files are size-checked, with a warning that the contents are not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping, Optional

from megatron_cegppo.fsutil import atomic_write_text, fsync_dir

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: sizes only
MANIFEST = "manifest.json"
LATEST = "latest"
DIGEST_ALGORITHM = "sha256"
DIGEST_CHUNK = 8 << 20
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def digest_file(path: str | Path, algorithm: str = DIGEST_ALGORITHM, chunk: int = DIGEST_CHUNK) -> str:
    """Hex digest of one file, read in ``chunk``-byte pieces into one reused buffer."""
    h = hashlib.new(algorithm)
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def digest_files(paths: Iterable[str | Path], root: str | Path | None = None,
                 algorithm: str = DIGEST_ALGORITHM, workers: Optional[int] = None) -> dict[str, str]:
    """``{name: hex digest}`` for ``paths``, hashed by ``workers`` threads. Names are the paths
    relative to ``root`` (POSIX form, as in the manifest) when it is given, else ``str(path)``.
    Any rank can call it on its share of a staging directory (:func:`split_files`)."""
    paths = [Path(p) for p in paths]
    names = [(p.relative_to(root).as_posix() if root is not None else str(p)) for p in paths]
    workers = _default_workers() if workers is None else max(1, workers)
    if workers == 1 or len(paths) <= 1:
        hexes = [digest_file(p, algorithm) for p in paths]
    else:
        with ThreadPoolExecutor(min(workers, len(paths))) as pool:
            hexes = list(pool.map(lambda p: digest_file(p, algorithm), paths))
    return dict(zip(names, hexes))


def split_files(paths: Iterable[str | Path], rank: int, world: int) -> list[Path]:
    """Rank ``rank``'s share of ``paths``: sorted by size (largest first, then name) and dealt
    round-robin, so every rank gets a similar number of bytes. Every rank must see the same
    files (call it after the barrier that ends the writes)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in [0, {world})")
    ordered = sorted((Path(p) for p in paths), key=lambda p: (-p.stat().st_size, str(p)))
    return ordered[rank::world]


def _manifest_digest(manifest: Mapping) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def describe_write_failure(exc: BaseException, store: "CheckpointStore") -> str:
    """One line for a failed save: the first failing rank's error (torch.distributed.checkpoint
    gathers them into one exception with every traceback), and a note when the file system is
    full, which the writers' errors rarely say (torch.save reports "unexpected pos ...")."""
    failures = getattr(exc, "failures", None)
    where = ""
    if isinstance(failures, dict) and failures:
        rank, exc = sorted(failures.items())[0]
        exc = exc[0] if isinstance(exc, tuple) else exc  # (exception, stack summary)
        where = f"rank {rank}: "
    # the last line of a wrapped traceback is the error itself
    lines = [line.strip() for line in f"{type(exc).__name__}: {exc}".splitlines() if line.strip()]
    message = where + lines[-1]
    full = store.disk_full_note()
    return f"{message}{'; ' + full if full else ''}"


class CheckpointStore:
    """The ``checkpoints/`` folder of a run. Rank 0 calls :meth:`commit` once every rank has
    finished writing into :meth:`staging_dir`; the digests can be computed by every rank on its
    share first (:meth:`digest_share`) and passed to :meth:`commit`."""

    def __init__(self, root: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        # path -> (fingerprint of its files' sizes and mtimes, verified?) so that pruning does
        # not re-hash a checkpoint this process has already checked and nobody has rewritten
        self._verified: dict[Path, tuple[tuple, bool]] = {}

    def disk_full_note(self) -> Optional[str]:
        """A note when the file system of the checkpoints has less room than the newest
        checkpoint takes (1 MiB before the first): the next save cannot fit."""
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            return None
        listed = self._listed()
        newest = sum(p.stat().st_size for p in listed[-1][1].rglob("*") if p.is_file()) if listed else 0
        if free >= (newest or 1 << 20):
            return None
        return (f"the file system of {self.root} is full ({free / 2**20:.1f} MiB free; the newest checkpoint "
                f"takes {newest / 2**20:.1f} MiB): free space there, then start again to resume")

    def staging_dir(self, step: int) -> Path:
        return self.root / f".staging-{step_dir_name(step)}"

    def clean_staging(self) -> None:
        """Removes what a killed save left (call on rank 0 before any rank writes)."""
        if self.root.exists():
            for path in self.root.glob(".staging-*"):
                shutil.rmtree(path, ignore_errors=True)

    def staged_files(self, step: int) -> list[Path]:
        """Every file staged for ``step`` (the manifest excluded), sorted."""
        staging = self.staging_dir(step)
        return sorted(p for p in staging.rglob("*") if p.is_file() and p != staging / MANIFEST)

    def digest_share(self, step: int, rank: int, world: int, workers: Optional[int] = None) -> dict[str, str]:
        """Digests of rank ``rank``'s share of the files staged for ``step``; the union of all
        ranks' shares, passed to :meth:`commit`, is the digest of every staged file."""
        return digest_files(split_files(self.staged_files(step), rank, world),
                            root=self.staging_dir(step), workers=workers)

    def commit(self, step: int, digests: Optional[Mapping[str, str]] = None,
               workers: Optional[int] = None) -> Path:
        """Makes the staged files durable, writes the manifest and publishes the checkpoint.
        ``digests`` (``{name: hex}``, e.g. the merged :meth:`digest_share` of every rank) are
        used as given; files they do not cover are hashed here; a name that is not staged is
        an error."""
        staging = self.staging_dir(step)
        if not staging.is_dir():
            raise CheckpointError(f"nothing staged for step {step} in {staging}")
        paths = self.staged_files(step)
        files = {}
        for path in paths:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[path.relative_to(staging).as_posix()] = path.stat().st_size
        given = dict(digests or {})
        unknown = sorted(set(given) - set(files))
        if unknown:
            raise CheckpointError(f"digests given for files not staged for step {step}: {unknown[:5]}")
        missing = [p for p in paths if p.relative_to(staging).as_posix() not in given]
        given.update(digest_files(missing, root=staging, workers=workers))
        for directory in sorted({p.parent for p in staging.rglob("*")} | {staging}):
            fsync_dir(directory)
        manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files,
                    "digest_algorithm": DIGEST_ALGORITHM,
                    "digests": {name: given[name] for name in files}}
        manifest["manifest_digest"] = _manifest_digest(manifest)
        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=1))
        final = self.root / step_dir_name(step)
        if final.exists():  # the same step saved again (e.g. on a stop signal): replace it
            shutil.rmtree(final)
        os.rename(staging, final)
        fsync_dir(self.root)
        atomic_write_text(self.root / LATEST, step_dir_name(step) + "\n")
        self._verified.pop(final, None)
        self._remember(final, True)
        self._prune()
        return final

    def _prune(self) -> None:
        """Keeps the ``keep`` newest checkpoints that verify and anything newer than the oldest
        of them (a damaged newer one is kept, not counted); deletes the rest."""
        kept = 0
        listed = self._listed()
        for index in range(len(listed) - 1, -1, -1):
            if self._is_verified(listed[index][1]):
                kept += 1
                if kept == self.keep:
                    for _, path in listed[:index]:
                        shutil.rmtree(path, ignore_errors=True)
                        self._verified.pop(path, None)
                    return

    @staticmethod
    def _fingerprint(path: Path) -> tuple:
        out = []
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            st = file.stat()
            out.append((file.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _remember(self, path: Path, ok: bool) -> None:
        self._verified[path] = (self._fingerprint(path), ok)

    def _is_verified(self, path: Path) -> bool:
        cached = self._verified.get(path)
        if cached is not None and cached[0] == self._fingerprint(path):
            return cached[1]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.verify(path)
            ok = True
        except CheckpointError:
            ok = False
        self._remember(path, ok)
        return ok

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
    def verify(path: Path, digests: Optional[Mapping[str, str]] = None,
               workers: Optional[int] = None) -> dict:
        """The manifest of a complete, unaltered checkpoint; :class:`CheckpointError` naming
        the first bad file otherwise. Every file's size is checked, then its contents against
        the manifest's digest (streamed). ``digests`` (``{name: hex}`` computed elsewhere, e.g.
        by each rank on its share with :func:`digest_files`) replace recomputing those files
        here. A version-1 manifest (no digests) is size-checked only, with a warning."""
        path = Path(path)
        manifest_path = path / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no {MANIFEST} (the save did not finish)") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable {MANIFEST}: {exc}") from None
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version not in READABLE_VERSIONS:
            raise CheckpointError(f"{path}: format version {version}, "
                                  f"this code reads {', '.join(map(str, READABLE_VERSIONS))}")
        if version >= 2 and manifest.get("manifest_digest") != _manifest_digest(manifest):
            raise CheckpointError(f"{path}: {MANIFEST} was altered (its own digest does not match)")
        files = manifest.get("files", {})
        for name, size in files.items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{path}: {name} is missing")
            if file.stat().st_size != size:
                raise CheckpointError(f"{path}: {name} has {file.stat().st_size} bytes, the manifest says {size}")
        if version == 1:
            warnings.warn(f"{path}: manifest format version 1 has no content digests; "
                          f"file sizes checked, contents not", UserWarning, stacklevel=2)
            return manifest
        expected = manifest.get("digests", {})
        algorithm = manifest.get("digest_algorithm", DIGEST_ALGORITHM)
        if algorithm not in hashlib.algorithms_available:
            raise CheckpointError(f"{path}: digest algorithm {algorithm!r} is not available here")
        no_digest = sorted(set(files) - set(expected))
        if no_digest:
            raise CheckpointError(f"{path}: {no_digest[0]} has no digest in the manifest")
        given = dict(digests or {})
        todo = [path / name for name in files if name not in given]
        given.update(digest_files(todo, root=path, algorithm=algorithm, workers=workers))
        for name in files:
            if given[name] != expected[name]:
                raise CheckpointError(f"{path}: {name} content does not match its {algorithm} "
                                      f"digest (altered or corrupt)")
        return manifest

    def check(self, path: Path, digests: Optional[Mapping[str, str]] = None) -> dict:
        """:meth:`verify` (with ``digests`` computed elsewhere, e.g. by every rank on its
        :meth:`share_digests`), remembering the outcome for pruning."""
        try:
            manifest = self.verify(path, digests=digests)
        except CheckpointError:
            if path.is_dir():
                self._remember(path, False)
            raise
        self._remember(path, True)
        return manifest

    def candidates(self) -> list[Path]:
        """The checkpoints to resume from, in the order :meth:`latest` tries them: the one the
        ``latest`` pointer names, then the others newest first."""
        named = self._named()
        rest = [path for _, path in reversed(self._listed()) if path != named]
        return ([named] if named is not None else []) + rest

    @staticmethod
    def share_digests(path: Path, rank: int, world: int, workers: Optional[int] = None) -> dict[str, str]:
        """Digests of rank ``rank``'s share of the files that :meth:`verify` of ``path`` would
        hash (those present at their recorded size): every rank hashes its share of a large
        checkpoint at resume, as at save. Empty when the manifest cannot be read (verify
        then says why)."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            files, algorithm = manifest["files"], manifest.get("digest_algorithm", DIGEST_ALGORITHM)
            hashlib.new(algorithm)
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        present = [path / name for name, size in files.items()
                   if (path / name).is_file() and (path / name).stat().st_size == size]
        return digest_files(split_files(present, rank, world), root=path, algorithm=algorithm, workers=workers)

    def latest(self) -> Optional[Path]:
        """The checkpoint to resume from: the one ``latest`` names if it verifies, else the
        newest one that verifies (with a warning naming the bad file); ``None`` when there is
        none."""
        for index, path in enumerate(self.candidates()):
            try:
                self.check(path)
            except CheckpointError as exc:
                self.warn_unusable(path, exc)
                continue
            if index:
                warnings.warn(f"resuming from {path.name} instead")
            return path
        return None

    def warn_unusable(self, path: Path, exc: CheckpointError) -> None:
        """The warning for a checkpoint passed over on the way to one that verifies."""
        if self._named() == path:
            warnings.warn(f"latest checkpoint unusable ({exc}); looking for an older one")
        else:
            warnings.warn(f"skipping checkpoint: {exc}")

    def _named(self) -> Optional[Path]:
        pointer = self.root / LATEST
        return self.root / pointer.read_text().strip() if pointer.exists() else None

    latest_verified = latest

    def unusable(self) -> list[tuple[Path, str]]:
        """Every checkpoint folder here with the reason it cannot be resumed from (empty when
        all verify)."""
        out = []
        for _, path in self._listed():
            try:
                self.check(path)
            except CheckpointError as exc:
                out.append((path, str(exc)))
        return out
