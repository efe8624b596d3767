"""The harness the parallel tests run on (:func:`megatron_cegppo.testing.multiprocess.run_distributed`):
ranks forked from a preloaded forkserver still see the caller's environment of the moment,
their output reaches the test that ran them, and a killed test runner takes them (and the
forkserver) with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from megatron_cegppo.testing.leaks import still_running
from megatron_cegppo.testing.multiprocess import run_distributed

pytestmark = pytest.mark.distributed


def _env_and_print(rank, world, name):
    print(f"rank {rank} of {world} says hello", flush=True)
    import megatron.core.parallel_state as ps

    return os.environ.get(name), ps.model_parallel_is_initialized()


def test_ranks_see_the_environment_of_the_moment_and_their_output_is_captured(monkeypatch, capsys):
    run_distributed(_env_and_print, 1, "UNSET")  # the forkserver exists now, without the variable
    monkeypatch.setenv("CEGPPO_HARNESS_PROBE", "set after the server started")
    out = run_distributed(_env_and_print, 2, "CEGPPO_HARNESS_PROBE")
    assert out == [("set after the server started", False)] * 2  # and megatron's state is pristine
    printed = capsys.readouterr().out
    assert "rank 0 of 2 says hello" in printed and "rank 1 of 2 says hello" in printed


RUNNER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {root!r})
    from megatron_cegppo.testing.multiprocess import run_distributed
    from tests.distributed.test_multiprocess_harness import _report_and_wait
    run_distributed(_report_and_wait, 2, {pids!r})
""")


def _report_and_wait(rank, world, pids_path):
    with open(pids_path, "a") as f:
        f.write(json.dumps({"rank": rank, "pid": os.getpid(), "parent": os.getppid()}) + "\n")
    time.sleep(600)


def test_a_killed_runner_takes_its_ranks_and_the_forkserver(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pids = tmp_path / "pids.jsonl"
    runner = subprocess.Popen([sys.executable, "-c", RUNNER.format(root=root, pids=str(pids))], cwd=root,
                              start_new_session=True)
    try:
        end = time.time() + 300
        while not pids.exists() or len(pids.read_text().splitlines()) < 2:
            assert runner.poll() is None, f"the runner exited with {runner.returncode}"
            assert time.time() < end, "the ranks did not start"
            time.sleep(0.2)
        ranks = [json.loads(line) for line in pids.read_text().splitlines()]
        forkserver = psutil.Process(ranks[0]["parent"])
        assert forkserver.ppid() == runner.pid  # the ranks' parent is the runner's forkserver
        procs = [psutil.Process(r["pid"]) for r in ranks] + [forkserver]
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
        alive = still_running(procs, 15)
        for p in alive:
            p.kill()
        assert not alive, f"outlived the runner: {[p.pid for p in alive]}"
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
