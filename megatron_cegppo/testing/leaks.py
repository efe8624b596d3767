"""Processes that outlive the test that started them.

A test's processes are found in the process table, not only among the test runner's
children: an orphan is reparented to PID 1 (or a subreaper), a Slurm job step runs under
slurmstepd. A process counts as the test runner's when it has the runner's uid, is not a
zombie, was not in the table when the scope began (pids are handed out in increasing order
up to ``pid_max`` before they are reused, so a new pid is a new process) and either descends
from the runner or carries the runner's :data:`TOKEN` in its environment (inherited through
fork, exec, torchrun and sbatch's default ``--export=ALL``). Other users' processes and
other test sessions on the same machine carry neither and are left alone. A process started
with a scrubbed environment and reparented away is missed.

Allowed to outlive a scope, each found through the module that owns it (never by a pattern):
the helpers the runner process itself keeps for its whole life (:func:`runner_helpers`);
they end with it (atexit handlers, or end of file on their pipe). Processes started by module- or session-scoped fixtures predate the tests that
use them (pytest sets up wider scopes first) and are checked at the end of their own scope.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import psutil

TOKEN = "MEGATRON_CEGPPO_TEST_RUNNER"
GRACE_S = 5.0  # for exits already under way (a parent's lifeline, a tracker at end of file)


def mark_runner() -> str:
    """Puts the runner's token in the environment that every process it starts inherits
    (kept when already set: a test runner started by a test belongs to the outer one)."""
    return os.environ.setdefault(TOKEN, f"{os.getpid()}-{time.time_ns()}")


def _pids() -> set[int]:
    return set(psutil.pids())  # one listing of /proc on Linux


@dataclass
class Snapshot:
    """The process table at the start of a scope (one directory listing: cheap)."""

    pids: frozenset
    started: float

    @classmethod
    def take(cls) -> "Snapshot":
        return cls(frozenset(_pids()), time.time())

    def new_processes(self) -> list:
        """The runner's live processes that appeared since the snapshot, helpers excluded."""
        allowed = runner_helpers()
        found = []
        for pid in _pids() - self.pids - allowed:
            p = _process(pid)
            if p is not None and self._ours(p):
                found.append(p)
        return found

    def _ours(self, p) -> bool:
        try:
            with p.oneshot():
                if p.uids().real != os.getuid() or p.status() == psutil.STATUS_ZOMBIE:
                    return False
                if p.create_time() < self.started - 1.0:  # clock ticks: a little slack
                    return False
                return _descends_from_runner(p) or _carries_token(p)
        except psutil.Error:
            return False


def _process(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _descends_from_runner(p) -> bool:
    me = os.getpid()
    try:
        return any(parent.pid == me for parent in p.parents())
    except psutil.Error:
        return False


def _carries_token(p) -> bool:
    token = os.environ.get(TOKEN)
    try:
        return token is not None and p.environ().get(TOKEN) == token
    except psutil.Error:
        return False


def runner_helpers() -> set[int]:
    """Pids of the helpers this process keeps for its whole life, each read from the module
    that owns it (never matched by name): multiprocessing's resource tracker, the math-verify
    worker (reused across calls by design), the Manager that serves dist_checkpointing's
    results queue (one per process, made on its first save), and the forkserver the parallel
    tests' ranks are forked from (:mod:`megatron_cegppo.testing.multiprocess`)."""
    pids = {_tracker_pid(), _math_worker_pid(), _results_manager_pid(), _forkserver_pid()}
    return {p for p in pids if p}


def _tracker_pid():
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    return getattr(getattr(tracker, "_resource_tracker", None), "_pid", None)


def _forkserver_pid():
    module = sys.modules.get("multiprocessing.forkserver")
    return getattr(getattr(module, "_forkserver", None), "_forkserver_pid", None)


def _math_worker_pid():
    module = sys.modules.get("megatron_cegppo.rewards.math_verify_reward")
    worker = getattr(module, "_worker", None)
    if worker is None or worker.owner_pid != os.getpid():
        return None
    return worker.proc.pid


def _results_manager_pid():
    module = sys.modules.get("megatron.core.dist_checkpointing.strategies.filesystem_async")
    manager = getattr(getattr(module, "_results_queue", None), "_manager", None)
    process = getattr(manager, "_process", None)
    return getattr(process, "pid", None)


def describe(p) -> str:
    try:
        with p.oneshot():
            cmd = " ".join(p.cmdline()) or p.name()
            return f"pid {p.pid} (parent {p.ppid()}, {p.memory_info().rss / 2**20:.0f} MB): {cmd[:300]}"
    except psutil.Error:
        return f"pid {p.pid} (gone)"


def wait_then_kill(procs: list, grace_s: float) -> list[str]:
    """Waits up to ``grace_s`` for ``procs`` to exit, then kills those left; returns their
    descriptions (taken before the kill)."""
    alive = still_running(procs, grace_s)
    names = [describe(p) for p in alive]
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    still_running(alive, 5.0)
    return names


def still_running(procs, seconds: float) -> list:
    """Those of ``procs`` (``psutil.Process`` objects or pids) still running after waiting up
    to ``seconds``. A zombie counts as gone: it has exited, and its reaper (a parent, or PID 1)
    may take its time."""
    end = time.monotonic() + seconds
    alive = [p for p in procs if _running(p)]
    while alive and time.monotonic() < end:
        time.sleep(0.02)
        alive = [p for p in alive if _running(p)]
    return alive


def _running(p) -> bool:
    try:
        p = psutil.Process(p) if isinstance(p, int) else p
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def leftovers(snapshot: Snapshot, grace_s: float | None = None) -> list[str]:
    """The scope's processes still running after the grace time (:data:`GRACE_S` unless
    given; killed by now), described."""
    found = snapshot.new_processes()
    return wait_then_kill(found, GRACE_S if grace_s is None else grace_s) if found else []
