"""One run per run directory: a lock file that a run takes at start and gives up at exit.

Two runs started on the same run directory would interleave their metrics, replace each
other's config.yaml and delete each other's checkpoint staging folder. The first run to
start holds ``<run_dir>/run.lock``; a second one refuses to start, naming the holder.

The lock works on shared filesystems (NFS, Lustre) where flock/fcntl locks are not always
honoured, because it relies only on namespace operations that the server performs
atomically:

* Creating: the record is written and fsynced to a uniquely named temporary file, which is
  then hard-linked to ``run.lock``. link() fails with EEXIST when the target exists, and on
  NFS (v2 and later, so NFSv3+ too) and Lustre it is a single operation on the server (the
  metadata server for Lustre), so of any number of contenders on any number of hosts exactly
  one succeeds. link() is used rather than O_CREAT|O_EXCL because it publishes a complete
  record at once (readers never see an empty or half-written lock) and because O_EXCL was
  not honoured by older NFS clients. An NFS reply lost on retransmission can make a
  successful link() report EEXIST, so the outcome is read from the temporary file's link
  count (2: it worked), as open(2) recommends. Where hard links are not supported, the lock
  falls back to os.open(O_CREAT|O_EXCL), atomic on NFSv3+ and Lustre.
* Rewriting (heartbeat, takeover): a new temporary file is os.replace()d onto the lock,
  so the lock file never goes missing and readers see the old or the new record.
* Taking over a stale lock: before replacing a stale record, a contender must create the
  claim file ``run.lock.takeover.<token>.<k>`` (with the same atomic link), named after the
  stale record's token; only one contender can create it, so only one replaces the record.
  The others see the winner's fresh record and refuse. A claim whose creator died is itself
  stale, and is superseded by claim ``k + 1``.

A lock is stale when its holder is gone: on the same host (and pid namespace), when its
pid is dead (or has been reused by another process, told apart by the process start time);
on another host,
when both its heartbeat and the lock file's mtime are older than ``stale_after_seconds``.
A Slurm job that is requeued takes over the lock of its own earlier start (same
SLURM_JOB_ID), since Slurm ends a job's processes before requeueing it.

A heartbeat can only say that a holder has stopped refreshing, not that it has stopped
writing: a holder on another host that hangs for longer than ``stale_after_seconds`` and
then carries on will find, at its next ``refresh()``, that the lock was taken over
(:class:`RunLockLostError`).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from megatron_cegppo.fsutil import fsync_dir

LOCK_NAME = "run.lock"
CLAIM_PREFIX = LOCK_NAME + ".takeover."
DEFAULT_STALE_AFTER_SECONDS = 1800.0
# errors meaning "this filesystem has no hard links": fall back to O_CREAT|O_EXCL
_NO_LINK_ERRNOS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}


class RunLockedError(RuntimeError):
    """The run directory is held by another run that is (as far as can be told) alive."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder


class RunLockLostError(RuntimeError):
    """This run's lock was taken over by another run (it was judged stale)."""


class StaleRunLockWarning(UserWarning):
    """A lock whose holder is gone (or an earlier start of this Slurm job) was taken over."""


def _now_iso(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).isoformat(timespec="seconds")


def _proc_start_ticks(pid: int) -> int | None:
    """The process start time (clock ticks since boot) from /proc, to detect pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        fields = data[data.rindex(b")") + 2:].split()
        return int(fields[19])
    except (ValueError, IndexError):
        return None


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()[0].decode()
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether ``pid`` is a live process on this host (and the same one, if its start time is known)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if _proc_state(pid) in ("Z", "X"):
        return False
    if start_ticks is not None:
        current = _proc_start_ticks(pid)
        if current is not None and current != start_ticks:
            return False  # the pid now belongs to another process
    return True


def _pid_namespace() -> str | None:
    """This process's pid namespace: pids on one host are comparable only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _write_new(path: Path, text: str) -> bool:
    """Creates ``path`` holding ``text``, fsynced (``O_EXCL``); ``False`` if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _write_tmp(directory: Path, text: str) -> Path:
    tmp = directory / f".{LOCK_NAME}.{uuid.uuid4().hex}.tmp"
    if not _write_new(tmp, text):
        raise FileExistsError(tmp)
    return tmp


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _replace(path: Path, text: str) -> None:
    """``path`` now holds ``text``, whole: written beside it, then renamed over it."""
    tmp = _write_tmp(path.parent, text)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _create_exclusive(path: Path, text: str) -> bool:
    """Creates ``path`` holding ``text`` if it does not exist; ``False`` if it does. Atomic."""
    tmp = _write_tmp(path.parent, text)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno not in _NO_LINK_ERRNOS:
                raise
            return _write_new(path, text)
        # the link count tells the truth even when an NFS retransmission reported EEXIST
        return os.stat(tmp).st_nlink == 2
    finally:
        _unlink(tmp)
        fsync_dir(path.parent)


def _read_record(path: Path) -> tuple[dict | None, float | None]:
    """(record, mtime); record ``{}`` when the file exists but cannot be parsed (being written),
    ``None`` when there is no file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
            mtime = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None, None
    try:
        record = json.loads(data.decode("utf-8"))
        if not isinstance(record, dict):
            record = {}
    except (ValueError, UnicodeDecodeError):
        record = {}
    return record, mtime


def describe(record: dict | None) -> str:
    """The holder as one line: host, pid, Slurm job, start and heartbeat."""
    if not record:
        return "an unknown holder (the lock record is empty or unreadable)"
    job = record.get("job_id") or "none"
    restart = record.get("restart_count")
    job_text = f"Slurm job {job}" + (f" (restart {restart})" if restart else "")
    beat = record.get("heartbeat")
    age = f", last heartbeat {_now_iso(beat)} ({max(0.0, time.time() - beat):.0f}s ago)" \
        if isinstance(beat, (int, float)) else ""
    started = record.get("started")
    started_text = _now_iso(started) if isinstance(started, (int, float)) else "unknown"
    return f"host {record.get('host')}, pid {record.get('pid')}, {job_text}, started {started_text}{age}"


class RunLock:
    """The lock of one run directory. Take it on rank 0 only (``enabled=False`` elsewhere).

    ``with RunLock(run_dir) as lock: ... lock.refresh() ...`` or ``acquire()`` / ``release()``.
    """

    def __init__(self, run_dir: str | os.PathLike, *, stale_after_seconds: float = DEFAULT_STALE_AFTER_SECONDS,
                 refresh_interval_seconds: float | None = None, enabled: bool = True,
                 wait_seconds: float = 10.0):
        """``stale_after_seconds``: how old the heartbeat of a holder on another host must be
        before its lock is taken over; longer than the longest gap between ``refresh()`` calls
        (a step plus a checkpoint save). ``refresh_interval_seconds``: ``refresh()`` rewrites
        the lock at most this often (default: a twentieth of ``stale_after_seconds``, at most
        30 s). ``wait_seconds``: how long ``acquire()`` waits while another contender is in the
        middle of taking over a stale lock."""
        if stale_after_seconds <= 0:
            raise ValueError("stale_after_seconds must be positive")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.stale_after_seconds = float(stale_after_seconds)
        self.refresh_interval_seconds = (min(30.0, self.stale_after_seconds / 20)
                                         if refresh_interval_seconds is None else float(refresh_interval_seconds))
        self.enabled = enabled
        self.wait_seconds = wait_seconds
        self.host = socket.gethostname()
        self.token: str | None = None
        self._record: dict | None = None
        self._last_write = 0.0

    # -- records -----------------------------------------------------------------------------

    def _new_record(self) -> dict:
        now = time.time()
        try:
            restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        except ValueError:
            restart = 0
        return {
            "token": uuid.uuid4().hex, "host": self.host, "pid": os.getpid(),
            "pid_start": _proc_start_ticks(os.getpid()), "pid_ns": _pid_namespace(),
            "job_id": os.environ.get("SLURM_JOB_ID") or None, "restart_count": restart,
            "started": now, "started_iso": _now_iso(now), "heartbeat": now, "heartbeat_iso": _now_iso(now),
        }

    def holder(self) -> dict | None:
        """The current lock record (``None``: not locked; ``{}``: a record being written)."""
        return _read_record(self.path)[0]

    @property
    def held(self) -> bool:
        return self.token is not None

    def _is_stale(self, record: dict, mtime: float | None) -> str | None:
        """Why ``record``'s holder counts as gone (``None``: it may be alive)."""
        now = time.time()
        beat = record.get("heartbeat")
        newest = max(x for x in (beat if isinstance(beat, (int, float)) else None, mtime, float("-inf"))
                     if x is not None)
        old = now - newest > self.stale_after_seconds
        if not record:
            return f"its record is unreadable and {now - newest:.0f}s old" if old else None
        if self._same_pid_space(record):
            if not pid_alive(record.get("pid"), record.get("pid_start")):
                return f"pid {record.get('pid')} on this host ({self.host}) is no longer running"
            return None
        job = os.environ.get("SLURM_JOB_ID")
        if job and record.get("job_id") == job:
            return f"it was taken by an earlier start of this Slurm job ({job})"
        if old:
            return f"its heartbeat is {now - newest:.0f}s old (limit {self.stale_after_seconds:.0f}s)"
        return None

    def _same_pid_space(self, record: dict) -> bool:
        """Whether ``record``'s pid can be checked here: same host and, where both are
        known, the same pid namespace (containers on one host may have their own)."""
        if record.get("host") != self.host:
            return False
        ns, mine = record.get("pid_ns"), _pid_namespace()
        return ns is None or mine is None or ns == mine

    # -- acquire / refresh / release ---------------------------------------------------------

    def acquire(self) -> "RunLock":
        """Takes the lock, taking over a stale one with a warning; :class:`RunLockedError`
        (naming the holder) when another live run holds it."""
        if not self.enabled or self.held:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_seconds
        while True:
            record = self._new_record()
            if _create_exclusive(self.path, json.dumps(record, indent=1)):
                self._took(record)
                return self
            current, mtime = _read_record(self.path)
            if current is None:
                continue  # released in the meantime
            reason = self._is_stale(current, mtime)
            if reason is None:
                raise RunLockedError(
                    f"run directory {self.run_dir} is in use by another run: {describe(current)}. "
                    f"Use another trainer.run_dir, or stop that run. If it is gone, its lock "
                    f"({self.path}) is taken over once its heartbeat is older than "
                    f"{self.stale_after_seconds:.0f}s; delete the file to take it over now.", current)
            outcome = self._take_over(current, record)
            if outcome == "won":
                warnings.warn(f"took over the lock of run directory {self.run_dir} from {describe(current)}: "
                              f"{reason}", StaleRunLockWarning, stacklevel=2)
                self._took(record)
                return self
            if time.monotonic() > deadline:
                raise RunLockedError(
                    f"run directory {self.run_dir}: another run is taking over the stale lock of "
                    f"{describe(current)}; retry later", current)
            time.sleep(0.02)  # another contender is taking over: look again

    def _took(self, record: dict) -> None:
        self.token = record["token"]
        self._record = record
        self._last_write = time.monotonic()
        self._clean_claims(keep=None)

    def _claim_path(self, token: str, k: int) -> Path:
        return self.run_dir / f"{CLAIM_PREFIX}{token}.{k}"

    def _take_over(self, stale: dict, record: dict) -> str:
        """Replaces the stale record by ``record`` if this contender wins its claim: "won",
        or "busy" (another contender has the claim, or the record changed)."""
        token = stale.get("token") or "unreadable"
        k = 0
        while True:
            claim = self._claim_path(token, k)
            mine = {"host": self.host, "pid": os.getpid(), "pid_start": _proc_start_ticks(os.getpid()),
                    "pid_ns": _pid_namespace(), "heartbeat": time.time()}
            if _create_exclusive(claim, json.dumps(mine)):
                break
            other, mtime = _read_record(claim)
            if other is None:
                return "busy"  # finished (and cleaned up) just now
            if self._is_stale(other, mtime) is None:
                return "busy"
            k += 1  # its claimer died: supersede its claim
        try:
            if self._claim_path(token, k + 1).exists():
                return "busy"  # judged dead and superseded meanwhile
            current, _ = _read_record(self.path)
            if current is None or (current.get("token") or "unreadable") != token:
                return "busy"
            _replace(self.path, json.dumps(record, indent=1))
            fsync_dir(self.run_dir)
            return "won"
        finally:
            for i in range(k + 1):
                _unlink(self._claim_path(token, i))

    def _clean_claims(self, keep: str | None) -> None:
        """Removes leftover claims on tokens that are no longer the lock's (ours excepted)."""
        try:
            names = os.listdir(self.run_dir)
        except OSError:
            return
        for name in names:
            if name.startswith(CLAIM_PREFIX):
                token = name[len(CLAIM_PREFIX):].rsplit(".", 1)[0]
                if token != self.token and token != keep:
                    _unlink(self.run_dir / name)

    def refresh(self, force: bool = False) -> None:
        """Renews the heartbeat (an atomic rewrite), at most every ``refresh_interval_seconds``
        unless ``force``; :class:`RunLockLostError` if another run has taken the lock over."""
        if not self.enabled or not self.held:
            return
        if not force and time.monotonic() - self._last_write < self.refresh_interval_seconds:
            return
        current, _ = _read_record(self.path)
        if current is None or current.get("token") != self.token:
            self.token = None
            raise RunLockLostError(f"the lock of run directory {self.run_dir} was taken over by "
                                   f"{describe(current) if current is not None else 'nobody (it was removed)'}; "
                                   f"stop writing to it")
        now = time.time()
        record = dict(self._record, heartbeat=now, heartbeat_iso=_now_iso(now))
        _replace(self.path, json.dumps(record, indent=1))
        self._record = record
        self._last_write = time.monotonic()

    def release(self) -> None:
        """Removes the lock if this run still holds it. Safe to call more than once."""
        if not self.enabled or not self.held:
            return
        current, _ = _read_record(self.path)
        if current is not None and current.get("token") == self.token:
            _unlink(self.path)
            fsync_dir(self.run_dir)
        self.token = None
        self._record = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.run_dir)!r}, held={self.held})"
