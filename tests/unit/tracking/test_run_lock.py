"""RunLock: one run per run directory, with stale-lock takeover, on real processes."""

import json
import multiprocessing as mp
import os
import queue
import socket
import time
import warnings

import pytest

from megatron_cegppo.tracking.run_lock import (
    LOCK_NAME,
    RunLock,
    RunLockedError,
    RunLockLostError,
    StaleRunLockWarning,
)

CTX = mp.get_context("spawn")
TIMEOUT = 60


@pytest.fixture
def procs():
    """Processes started by a test; all are ended and reaped afterwards."""
    started = []
    yield started
    for p in started:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join(timeout=10)
        assert not p.is_alive()


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)


# -- children (module level: the spawn context imports them) --------------------------------

def _hold(run_dir, job_id, ready, done):
    """Takes the lock as Slurm job ``job_id`` and holds it until ``done`` is set."""
    os.environ["SLURM_JOB_ID"] = job_id
    os.environ["SLURM_RESTART_COUNT"] = "2"
    with RunLock(run_dir):
        ready.set()
        done.wait(TIMEOUT)


def _take_and_die(run_dir):
    """Takes the lock and exits without releasing it (a crash)."""
    RunLock(run_dir).acquire()
    os._exit(0)


def _race(worker, run_dirs, barrier, results):
    """For each directory: all workers try at once, then the winner releases."""
    warnings.simplefilter("ignore", StaleRunLockWarning)
    for run_dir in run_dirs:
        barrier.wait(TIMEOUT)
        lock = RunLock(run_dir)
        try:
            lock.acquire()
            results.put((run_dir, worker, "won"))
        except RunLockedError:
            results.put((run_dir, worker, "refused"))
        barrier.wait(TIMEOUT)  # everyone has tried while the winner holds it
        lock.release()


def _dead_pid(procs):
    p = CTX.Process(target=os._exit, args=(0,))
    p.start()
    procs.append(p)
    p.join(TIMEOUT)
    return p.pid


def _write_lock(run_dir, **fields):
    now = time.time()
    record = {"token": "t" + str(now), "host": socket.gethostname(), "pid": 1, "job_id": None,
              "restart_count": 0, "started": now, "heartbeat": now}
    record.update(fields)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_NAME)
    with open(path, "w") as f:
        json.dump(record, f)
    mtime = min(record["heartbeat"], now)
    os.utime(path, (mtime, mtime))
    return record


# -- tests ----------------------------------------------------------------------------------

def test_acquire_writes_record_and_release_removes_it(tmp_path):
    run_dir = tmp_path / "run"
    lock = RunLock(run_dir)
    assert lock.holder() is None
    lock.acquire()
    record = lock.holder()
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    assert record["started"] <= record["heartbeat"] <= time.time()
    assert (run_dir / LOCK_NAME).exists()
    lock.release()
    assert not (run_dir / LOCK_NAME).exists() and lock.holder() is None
    lock.release()  # twice is fine
    assert [p.name for p in run_dir.iterdir()] == []  # no temporary or claim files left


def test_context_manager_releases_on_error(tmp_path):
    with pytest.raises(ValueError):
        with RunLock(tmp_path) as lock:
            assert lock.held
            raise ValueError("boom")
    assert not (tmp_path / LOCK_NAME).exists()


def test_second_run_in_same_process_refuses(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()


def test_refresh_updates_heartbeat(tmp_path):
    lock = RunLock(tmp_path, refresh_interval_seconds=0).acquire()
    first = lock.holder()
    time.sleep(0.02)
    lock.refresh()
    second = lock.holder()
    assert second["heartbeat"] > first["heartbeat"]
    assert second["token"] == first["token"] and second["started"] == first["started"]
    # throttled: no rewrite before the interval has passed, unless forced
    slow = RunLock(tmp_path / "b", refresh_interval_seconds=3600).acquire()
    before = slow.holder()["heartbeat"]
    time.sleep(0.02)
    slow.refresh()
    assert slow.holder()["heartbeat"] == before
    slow.refresh(force=True)
    assert slow.holder()["heartbeat"] > before
    lock.release()
    slow.release()


def test_live_holder_in_another_process_refuses_naming_it(tmp_path, procs, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "111")
    ready, done = CTX.Event(), CTX.Event()
    p = CTX.Process(target=_hold, args=(str(tmp_path), "4242", ready, done))
    p.start()
    procs.append(p)
    try:
        assert ready.wait(TIMEOUT)
        with pytest.raises(RunLockedError) as err:
            RunLock(tmp_path).acquire()
        message = str(err.value)
        assert isinstance(err.value, RuntimeError)
        assert socket.gethostname() in message and f"pid {p.pid}" in message
        assert "Slurm job 4242" in message and "restart 2" in message and "started" in message
        assert err.value.holder["pid"] == p.pid
    finally:
        done.set()
    p.join(TIMEOUT)
    assert p.exitcode == 0
    assert not (tmp_path / LOCK_NAME).exists()  # released on normal exit


def test_dead_holder_is_taken_over_with_warning(tmp_path, procs):
    p = CTX.Process(target=_take_and_die, args=(str(tmp_path),))
    p.start()
    procs.append(p)
    p.join(TIMEOUT)
    assert p.exitcode == 0
    assert RunLock(tmp_path).holder()["pid"] == p.pid
    lock = RunLock(tmp_path)
    with pytest.warns(StaleRunLockWarning, match=f"pid {p.pid}.*no longer running"):
        lock.acquire()
    assert lock.holder()["pid"] == os.getpid()
    lock.release()


def test_reused_pid_counts_as_dead(tmp_path):
    # the pid is alive (this process) but the recorded start time is another process's
    _write_lock(tmp_path, pid=os.getpid(), pid_start=1)
    with pytest.warns(StaleRunLockWarning):
        RunLock(tmp_path).acquire().release()


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    _write_lock(tmp_path, host="other-node", pid=12345, job_id="9001")  # fresh heartbeat
    monkeypatch.setenv("SLURM_JOB_ID", "9002")
    with pytest.raises(RunLockedError, match="other-node.*pid 12345.*Slurm job 9001"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "9001")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunLock(tmp_path)
    with pytest.warns(StaleRunLockWarning, match="earlier start of this Slurm job"):
        lock.acquire()
    record = lock.holder()
    assert record["job_id"] == "9001" and record["restart_count"] == 1 and record["pid"] == os.getpid()
    lock.release()


def test_other_host_stale_heartbeat_is_taken_over(tmp_path):
    _write_lock(tmp_path, host="other-node", pid=1, job_id="5", heartbeat=time.time() - 30)
    with pytest.raises(RunLockedError, match="other-node"):
        RunLock(tmp_path, stale_after_seconds=60).acquire()
    lock = RunLock(tmp_path, stale_after_seconds=10)
    with pytest.warns(StaleRunLockWarning, match="heartbeat is 3\\ds old"):
        lock.acquire()
    assert lock.holder()["host"] == socket.gethostname()
    lock.release()


def test_taken_over_holder_learns_on_refresh(tmp_path):
    lock = RunLock(tmp_path, refresh_interval_seconds=0).acquire()
    _write_lock(tmp_path, host="other-node", pid=3)  # someone replaced the record
    with pytest.raises(RunLockLostError, match="other-node"):
        lock.refresh()
    lock.release()
    assert (tmp_path / LOCK_NAME).exists()  # the new holder's lock is left alone


def test_unreadable_lock_refuses_until_old(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(RunLockedError, match="unknown holder"):
        RunLock(tmp_path).acquire()
    old = time.time() - 100
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with pytest.warns(StaleRunLockWarning):
        RunLock(tmp_path, stale_after_seconds=50).acquire().release()


def test_disabled_lock_does_nothing(tmp_path):
    with RunLock(tmp_path / "x", enabled=False) as lock:
        lock.refresh(force=True)
    assert not (tmp_path / "x").exists()


def test_stale_claim_is_superseded(tmp_path):
    stale = _write_lock(tmp_path, host="other-node", heartbeat=time.time() - 100)
    claim = tmp_path / f"{LOCK_NAME}.takeover.{stale['token']}.0"
    claim.write_text(json.dumps({"host": "other-node", "pid": 1, "heartbeat": time.time()}))
    with pytest.raises(RunLockedError, match="taking over"):
        RunLock(tmp_path, stale_after_seconds=50, wait_seconds=0.2).acquire()  # a live claim: wait
    old = time.time() - 100
    os.utime(claim, (old, old))
    claim.write_text(json.dumps({"host": "other-node", "pid": 1, "heartbeat": old}))
    os.utime(claim, (old, old))
    with pytest.warns(StaleRunLockWarning):
        lock = RunLock(tmp_path, stale_after_seconds=50).acquire()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]
    lock.release()


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_racing_processes_exactly_one_wins(tmp_path, procs, stale):
    workers, rounds = 3, 15
    run_dirs = [str(tmp_path / f"r{i}") for i in range(rounds)]
    if stale:  # every round starts from a lock left by a dead process
        dead = _dead_pid(procs)
        for run_dir in run_dirs:
            _write_lock(run_dir, pid=dead)
    barrier, results = CTX.Barrier(workers), CTX.Queue()
    for w in range(workers):
        p = CTX.Process(target=_race, args=(w, run_dirs, barrier, results))
        p.start()
        procs.append(p)
    outcomes = {}
    for _ in range(workers * rounds):
        try:
            run_dir, worker, outcome = results.get(timeout=TIMEOUT)
        except queue.Empty:
            pytest.fail("a racing process did not report")
        outcomes.setdefault(run_dir, []).append(outcome)
    for p in procs:
        p.join(TIMEOUT)
        assert p.exitcode == 0
    for run_dir in run_dirs:
        assert sorted(outcomes[run_dir]) == ["refused"] * (workers - 1) + ["won"], run_dir
        assert os.listdir(run_dir) == []  # the winner released; no temporary or claim files
