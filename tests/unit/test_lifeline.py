"""The lifeline with plain Python processes: a process exits within seconds of its parent's
SIGKILL, and takes its children with it (forked ones through the fork hook, exec'd ones
through the watchdog's kill). Without the lifeline every one of them sleeps on for a minute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from megatron_cegppo.testing.leaks import still_running

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process semantics")

EXIT_WITHIN_S = 10.0  # the watchdog polls every 0.5 s; a loaded machine is slower to schedule it

PRELUDE = """
import json, os, subprocess, sys, threading, time
from megatron_cegppo.lifeline import exit_with_parent, exit_with_launcher
def report(**pids):
    print(json.dumps(pids), flush=True)
"""

# A parent that starts `CHILD` (given as argv[1]) and passes the child's report on.
PARENT = PRELUDE + """
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
print(child.stdout.readline(), end="", flush=True)
time.sleep(60)
"""


def _start(code: str, *args: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"no report: {proc.communicate()[1][-2000:]}")
    return proc, json.loads(line)


def _child(body: str) -> str:
    return PRELUDE + textwrap.dedent(body)






def _process(pid):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@pytest.fixture
def cleanup():
    """Kills whatever the test started, whatever happened."""
    pids: list[int] = []
    yield pids
    for p in filter(None, map(_process, pids)):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _kill(proc: subprocess.Popen) -> float:
    proc.kill()
    proc.wait()
    return time.monotonic()


def test_child_exits_when_its_parent_is_killed(cleanup):
    parent, pids = _start(PARENT, _child("""
        exit_with_parent()
        report(child=os.getpid())
        time.sleep(60)
    """))
    cleanup += [parent.pid, pids["child"]]
    t0 = _kill(parent)
    assert still_running([pids["child"]], EXIT_WITHIN_S) == [], "the child outlived its parent"
    print(f"child gone {time.monotonic() - t0:.2f} s after its parent")
    # the child wrote to the stderr it shared with its parent
    assert f"[lifeline] pid {pids['child']}: parent {parent.pid} exited" in parent.stderr.read()


def test_watchdog_kills_children_without_a_lifeline(cleanup):
    """The child exits and takes its exec'd child (no lifeline of its own) with it; the
    resource tracker it started is spared the kill and goes by itself."""
    parent, pids = _start(PARENT, _child("""
        import multiprocessing as mp
        exit_with_parent()
        lock = mp.get_context("spawn").Lock()  # starts the resource tracker
        sleeper = subprocess.Popen(["sleep", "60"])
        from multiprocessing import resource_tracker
        report(child=os.getpid(), sleeper=sleeper.pid, tracker=resource_tracker._resource_tracker._pid)
        time.sleep(60)
    """))
    cleanup += [parent.pid, *pids.values()]
    assert all(psutil.pid_exists(p) for p in pids.values())
    _kill(parent)
    assert still_running(pids.values(), EXIT_WITHIN_S) == [], pids


def test_forked_child_dies_with_a_sigkilled_parent(cleanup):
    """A process killed by SIGKILL cannot clean up: its forked children (os.fork and
    multiprocessing's fork context, as dist_checkpointing's writers) go anyway."""
    child, pids = _start(_child("""
        import multiprocessing as mp
        exit_with_parent()
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        writer = mp.get_context("fork").Process(target=time.sleep, args=(60,))
        writer.start()
        report(forked=pid, writer=writer.pid)
        time.sleep(60)
    """))
    cleanup += [child.pid, *pids.values()]
    t0 = _kill(child)
    assert still_running(pids.values(), EXIT_WITHIN_S) == [], pids
    print(f"forked children gone {time.monotonic() - t0:.2f} s after their parent")


def test_fork_from_a_thread_outlives_the_thread_not_the_process(cleanup):
    """The kernel's parent-death signal follows the forking thread; a child forked from a
    thread that ends must stay, and still go with the process."""
    child, pids = _start(_child("""
        exit_with_parent()
        forked = []
        def fork():
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            forked.append(pid)
        t = threading.Thread(target=fork)
        t.start()
        t.join()
        time.sleep(1.0)  # the forking thread has ended
        report(forked=forked[0])
        time.sleep(60)
    """))
    cleanup += [child.pid, pids["forked"]]
    assert psutil.pid_exists(pids["forked"]), "killed when the thread that forked it ended"
    _kill(child)
    assert still_running([pids["forked"]], EXIT_WITHIN_S) == []


def test_once_per_process_and_covers_forks():
    out = subprocess.run([sys.executable, "-c", _child("""
        first, second = exit_with_parent(), exit_with_parent()
        watchdogs = sum(t.name == "lifeline" for t in threading.enumerate())
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, json.dumps(exit_with_parent()).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        report(first=first, second=second, watchdogs=watchdogs, in_fork=json.loads(os.read(r, 100)))
    """)], capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout) == {"first": True, "second": False, "watchdogs": 1, "in_fork": False}, out.stderr


@pytest.mark.parametrize("launched", [False, True])
def test_only_under_a_launcher(launched):
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    if launched:
        env["TORCHELASTIC_RUN_ID"] = "test"
    out = subprocess.run([sys.executable, "-c", _child("""
        report(set_up=exit_with_launcher(), watchdogs=sum(t.name == "lifeline" for t in threading.enumerate()))
    """)], capture_output=True, text=True, env=env, timeout=60)
    assert json.loads(out.stdout) == {"set_up": launched, "watchdogs": int(launched)}, out.stderr
