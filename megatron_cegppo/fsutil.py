"""Durable file writes: a file replaced whole (readers see the old or the new one) and a
directory entry made to survive a crash. Shared by the run directory (tracking/) and the
checkpoint store (checkpoint/)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see either the old or the new file.

    The temporary file lives in the same directory, since os.replace is only atomic
    within one filesystem.
    """
    path = Path(path)
    # mkstemp creates the file as 0600; keep the mode of the file being replaced instead.
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform/filesystem allows it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
