"""The suite's process-leak check (``tests/conftest.py``), run on a small inner suite: it names
and kills what a test or a module fixture leaves running, orphans reparented away included,
and leaves alone what exits in time, the runner's own helpers and other sessions' processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

INNER = '''
import subprocess, time

import psutil, pytest

def test_leaks_a_child():
    subprocess.Popen(["sleep", "6001"])

def test_leaks_an_orphan():
    subprocess.run(["sh", "-c", "sleep 6002 & exit 0"], check=True)  # reparented at once

def test_child_that_exits_in_the_grace_time():
    subprocess.Popen(["sleep", "0.3"])

def test_foreign_process():
    # what another session's process looks like: not a descendant, not carrying the token.
    # Waited for until it runs as sleep: until its exec it is the runner's shell, token and all.
    out = subprocess.run(["sh", "-c", "env -u MEGATRON_CEGPPO_TEST_RUNNER sleep 6004 >/dev/null 2>&1 & echo $!"],
                         check=True, capture_output=True, text=True).stdout
    foreign, deadline = psutil.Process(int(out)), time.monotonic() + 60
    while foreign.cmdline() != ["sleep", "6004"]:
        assert time.monotonic() < deadline, foreign.cmdline()
        time.sleep(0.01)

def test_runner_helper_may_stay():
    from megatron_cegppo.rewards.math_verify_reward import call_bounded
    assert call_bounded("os:getpid", [], 120) > 0

@pytest.fixture(scope="module")
def server():
    subprocess.Popen(["sleep", "6003"])  # never stopped
    yield

def test_uses_a_leaky_module_fixture(server):
    pass
'''


def _sleepers(marks) -> list:
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] in [["sleep", m] for m in marks]]


def test_leaks_are_named_killed_and_only_ours(tmp_path):
    # the suite's conftest, with a shorter grace time (the exiting child needs 0.3 s; the rest
    # is slack for a busy machine)
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text() + "\nleaks.GRACE_S = 3.0\n")
    (tmp_path / "test_inner.py").write_text(INNER)
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
        report = out.stdout
        errors = {line.split("::")[1].split(" ")[0] for line in report.splitlines() if line.startswith("ERROR ")}
        assert errors == {"test_leaks_a_child", "test_leaks_an_orphan", "test_uses_a_leaky_module_fixture"}, report
        for mark in ("sleep 6001", "sleep 6002", "sleep 6003"):
            assert mark in report, report  # named, with pid and command line
        assert "6 passed, 3 errors" in report, report
        assert _sleepers(["6001", "6002", "6003"]) == [], "a leftover was not killed"
        assert len(_sleepers(["6004"])) == 1, "a process not the session's was touched"
    finally:
        for p in _sleepers(["6001", "6002", "6003", "6004"]):
            p.kill()
