"""StopClock: when the trainer stops by itself before the job's time limit, from measured
step and save times (the current time is passed in: nothing sleeps)."""

from __future__ import annotations

import json

import pytest

from megatron_cegppo.trainer.stopping import (
    JOB_END_TIME_ENV, RECENT_TIMES, SAFETY_FACTOR, SLURM_MARGIN_SECONDS, STOP_LEAD_ENV, TIMING_FILE, StopClock,
    load_timing, save_timing,
)


def test_from_env_reads_end_time_and_lead_and_tolerates_junk():
    clock = StopClock.from_env({JOB_END_TIME_ENV: "1800000000", STOP_LEAD_ENV: "300"})
    assert clock.job_end_time == 1800000000 and clock.stop_lead_seconds == 300
    for junk in ("", "Unknown", "nan", "inf", "-5", "0"):
        clock = StopClock.from_env({JOB_END_TIME_ENV: junk, STOP_LEAD_ENV: junk})
        assert clock.job_end_time is None and clock.stop_lead_seconds is None, junk
    assert StopClock.from_env({}).job_end_time is None


def test_needed_seconds_is_the_worst_recent_step_plus_a_save_with_margins():
    clock = StopClock()
    assert clock.needed_seconds() is None  # nothing measured yet
    clock.record_step(100.0)
    # before a save was measured, a save counts as long as a step
    assert clock.needed_seconds() == pytest.approx(SAFETY_FACTOR * 200.0 + SLURM_MARGIN_SECONDS)
    clock.record_step(300.0)
    clock.record_step(200.0)
    clock.record_save(40.0)
    assert clock.needed_seconds() == pytest.approx(SAFETY_FACTOR * (300.0 + 40.0) + SLURM_MARGIN_SECONDS)
    for _ in range(RECENT_TIMES):  # the slow step leaves the window of recent steps
        clock.record_step(50.0)
    assert clock.needed_seconds() == pytest.approx(SAFETY_FACTOR * (50.0 + 40.0) + SLURM_MARGIN_SECONDS)
    clock.record_step(float("nan"))  # ignored
    clock.record_step(-1.0)
    assert max(clock.step_seconds) == 50.0 and len(clock.step_seconds) == RECENT_TIMES


def test_should_stop_when_the_time_left_is_shorter_than_one_more_step_and_a_save():
    end = 1_000_000.0
    clock = StopClock(job_end_time=end)
    assert clock.should_stop(now=end - 1) is None  # not measured: no opinion
    clock.record_step(600.0)
    clock.record_save(120.0)
    needed = clock.needed_seconds()
    assert needed == pytest.approx(1.25 * 720 + 60)
    assert clock.should_stop(now=end - needed - 1) is None
    reason = clock.should_stop(now=end - needed + 1)
    assert reason and "time limit" in reason
    assert clock.should_stop(now=end + 10)  # already past it: stop too
    assert clock.seconds_left(now=end - 5) == 5
    assert StopClock(step_seconds=[600.0]).should_stop(now=0.0) is None  # end time unknown


def test_lead_warning_when_the_signal_comes_too_late_for_a_step_and_a_save():
    clock = StopClock(stop_lead_seconds=300)
    assert clock.lead_warning() is None
    clock.record_step(60.0)
    clock.record_save(30.0)  # 1.25 * 90 + 60 = 172.5 < 300
    assert clock.lead_warning() is None
    clock.record_step(1800.0)  # a 32B step
    warning = clock.lead_warning()
    assert warning and "--signal-seconds" in warning and str(int(clock.needed_seconds() + 0.999)) in warning
    assert StopClock(step_seconds=[1800.0]).lead_warning() is None  # lead unknown


def test_timing_round_trips_through_the_run_directory(tmp_path):
    assert load_timing(tmp_path) is None
    clock = StopClock(job_end_time=123.0, stop_lead_seconds=300)
    clock.record_step(10.0)
    clock.record_step(12.5)
    clock.record_save(4.0)
    save_timing(tmp_path, clock)
    data = json.loads((tmp_path / TIMING_FILE).read_text())
    assert data["step_seconds"] == [10.0, 12.5] and data["save_seconds"] == [4.0]
    assert data["needed_seconds"] == pytest.approx(clock.needed_seconds())
    loaded = load_timing(tmp_path)
    assert loaded.step_seconds == [10.0, 12.5] and loaded.save_seconds == [4.0]
    assert loaded.job_end_time is None  # the end time belongs to one start
    # a restart: end time and lead from its environment, measured times from the file
    restarted = StopClock.from_env({JOB_END_TIME_ENV: "5000", STOP_LEAD_ENV: "120"}, measured=loaded)
    assert restarted.job_end_time == 5000 and restarted.needed_seconds() == pytest.approx(clock.needed_seconds())
    assert StopClock.from_dict(clock.to_dict()).to_dict() == clock.to_dict()
    (tmp_path / TIMING_FILE).write_text("{not json")
    assert load_timing(tmp_path) is None
    (tmp_path / TIMING_FILE).write_text("[1, 2]")
    assert load_timing(tmp_path) is None
