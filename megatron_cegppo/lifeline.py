"""A process that exits within seconds of its parent's death and takes its children with it.

Why it is needed: torchrun starts every rank in a session of its own (its
``SubprocessHandler`` passes ``start_new_session=True`` and stops ranks with ``killpg``), so
a kill -9 of torchrun reaches no rank: Linux reparents them (to PID 1 or the nearest
subreaper) and they train on, unsupervised. A rank killed with SIGKILL runs no cleanup
either, so what it started is orphaned the same way: dist_checkpointing's writers (forked by
megatron-core through ``multiprocessing``'s fork context, one per write bucket), the spawned
Manager that serves their results queue (``checkpoint/save_compat.py``), the math-verify
worker (``subprocess``), and through them the ``multiprocessing`` resource tracker, which
lives until every holder of its pipe is gone.

:func:`exit_with_parent` gives a process two things:

* a daemon thread that compares ``os.getppid()`` with the parent recorded at the call every
  ``POLL_S`` seconds. It relies on Linux reparenting orphans, and on ``getppid()`` naming the
  parent *process*: a parent thread that ends does not change it. When it changes, the thread
  SIGKILLs the process's descendants (all but the resource tracker, which unlinks what they
  leaked and exits by itself once they are gone) and exits the process with one line on
  stderr.
* an ``os.register_at_fork`` hook, so every child this process forks is covered at once
  (a SIGKILLed parent cannot clean up after itself). A child forked from the main thread gets
  ``PR_SET_PDEATHSIG(SIGKILL)``: the kernel kills it when its parent dies, even while it holds
  the GIL in C code. The kernel ties that signal to the forking *thread*, and a Python main
  thread ends only with its process; a child forked from any other thread (which may end
  first) gets the watchdog thread instead. The hook is inherited by forked children, so
  their own forks are covered too.

Not covered by the hook: children started by exec (``subprocess``, ``multiprocessing``'s
spawn context) run none of this process's code (``os.register_at_fork`` hooks run for
``os.fork`` only, and for ``subprocess`` with a ``preexec_fn``); they call
:func:`exit_with_parent` themselves (the results-queue Manager and the math-verify worker
do), and the watchdog kills them when this process's own parent dies. A forked child that the
kernel's signal ends cannot kill its exec'd children either. A process whose parent is
already gone when it calls :func:`exit_with_parent` cannot tell (its recorded parent is then
the reaper).

Cost: one thread per process, awake every ``POLL_S`` seconds for one system call.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

POLL_S = 0.5
EXIT_CODE = 1
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_TRACKER_MAIN = "multiprocessing.resource_tracker"

_lock = threading.Lock()
_covered_pid: Optional[int] = None  # the process the lifeline is set up in (a fork copies it)
_hook_registered = False  # fork hooks are inherited by forked children: register them once
_fork_from_main = True  # set in the parent, by the forking thread, just before each fork
_fork_parent = 0  # the forking process's pid, set with it
_prctl = None  # libc's prctl (resolved once in the parent; ctypes is not set up per fork)


def under_launcher() -> bool:
    """Whether torchrun started this process (it sets ``TORCHELASTIC_RUN_ID`` for its ranks)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def exit_with_launcher() -> bool:
    """:func:`exit_with_parent` in a rank that torchrun started; nothing elsewhere: a process
    running a trainer in-process (pytest, a notebook) has the user's shell or test runner as
    its parent, and outliving that is its own business. True when the lifeline was set up."""
    return under_launcher() and exit_with_parent()


def exit_with_parent(poll_s: float = POLL_S) -> bool:
    """Makes this process exit within about ``poll_s`` seconds of its parent's death, with
    its descendants, and every child it forks from now on die with it. Idempotent: True when
    this call set it up, False when it already was."""
    global _covered_pid
    with _lock:
        if _covered_pid == os.getpid():
            return False
        _covered_pid = os.getpid()
        import psutil  # noqa: F401  (now, not on the way out: the exit path stays short)

        _register_fork_hooks()
        _start_watchdog(os.getppid(), poll_s)
    return True


def exit_with_process(pid: int, poll_s: float = POLL_S) -> None:
    """Makes this process exit, with its descendants, within about ``poll_s`` seconds of the
    death of process ``pid``, which is not its parent: a process that a server forks on
    someone's behalf (``multiprocessing``'s forkserver) has the server as its parent, and the
    server lives on while any of its children holds its pipe, so neither would notice the
    client's death. Combine with :func:`exit_with_parent` for the server's own death."""
    import psutil

    try:
        born = psutil.Process(pid).create_time()  # a reused pid is another process
    except psutil.Error:
        _die(pid, "process")
        return

    def alive() -> bool:
        try:
            p = psutil.Process(pid)
            return p.create_time() == born and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def watch() -> None:
        while alive():
            time.sleep(poll_s)
        _die(pid, "process")

    threading.Thread(target=watch, name="lifeline-client", daemon=True).start()


def dies_with_this_process():
    """A ``preexec_fn`` for ``subprocess.Popen`` (called from the main thread: the kernel ties
    the signal to the forking thread) whose child is SIGKILLed by the kernel when this process
    dies, while this process itself lives as long as it likes (unlike :func:`exit_with_parent`).
    A child that exec's torchrun takes its ranks along: they watch their parent."""
    prctl, parent = _find_prctl(), os.getpid()

    def arm() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # died before the signal was armed
            os._exit(EXIT_CODE)

    return arm


def _start_watchdog(parent: int, poll_s: float) -> None:
    t = threading.Thread(target=_watch, args=(parent, poll_s), name="lifeline", daemon=True)
    t.start()


def _watch(parent: int, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    _die(parent)


def _die(parent: int, what: str = "parent") -> None:
    """The parent is gone: descendants first (they may be stuck or have no lifeline of their
    own), then this process, without cleanup (nobody waits for it; handlers could block)."""
    try:
        n = _kill_descendants()
    except Exception as e:  # noqa: BLE001 - exiting matters more than the count
        n = f"? ({e!r})"
    msg = f"[lifeline] pid {os.getpid()}: {what} {parent} exited; killed {n} descendant(s), exiting\n"
    try:
        os.write(2, msg.encode())  # not sys.stderr: another thread may hold its lock
    except OSError:
        pass
    os._exit(EXIT_CODE)


def _kill_descendants() -> int:
    import psutil

    victims = [p for p in psutil.Process().children(recursive=True) if not _is_resource_tracker(p)]
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(victims)


def _is_resource_tracker(p) -> bool:
    try:
        return any(_TRACKER_MAIN in part for part in p.cmdline())
    except Exception:  # noqa: BLE001 - gone or unreadable: not one to spare
        return False


def _register_fork_hooks() -> None:
    global _hook_registered, _prctl
    if _hook_registered or not hasattr(os, "register_at_fork"):
        return
    _prctl = _find_prctl()
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _hook_registered = True


def _find_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _before_fork() -> None:
    global _fork_from_main, _fork_parent
    _fork_from_main = threading.current_thread() is threading.main_thread()
    _fork_parent = os.getpid()


def _after_fork_in_child() -> None:
    """Runs in every forked child (after threading's own fork handler)."""
    global _covered_pid, _lock
    _lock = threading.Lock()  # the parent's may have been held by another thread
    _covered_pid = os.getpid()
    parent = _fork_parent
    if not (_fork_from_main and _set_parent_death_signal()):
        _start_watchdog(parent, POLL_S)
    # The parent may have died before the signal was armed: the kernel would never send it.
    if os.getppid() != parent:
        os._exit(EXIT_CODE)


def _set_parent_death_signal() -> bool:
    if _prctl is None:
        return False
    return _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
