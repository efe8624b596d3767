"""A failure after start-up: one line on stderr from the rank that should say it, the
traceback in the run directory's log."""

from __future__ import annotations

import pytest

from megatron_cegppo.checkpoint.store import CheckpointError
from megatron_cegppo.trainer.failure import EXIT_FAILED, run_reporting_failures


def _fail(exc):
    def fn():
        raise exc
    return fn


@pytest.mark.parametrize("rank", ["0", "1"])
def test_an_error_every_rank_meets_is_said_once_by_rank_0(tmp_path, capsys, monkeypatch, rank):
    monkeypatch.setenv("RANK", rank)
    status = run_reporting_failures(_fail(CheckpointError("no checkpoint:\n  step_3: a file differs\n  step_2: missing")),
                                    str(tmp_path))
    assert status == EXIT_FAILED
    err = capsys.readouterr().err
    if rank == "0":
        assert err.count("\n") == 1, err
        assert err.startswith("megatron-cegppo: no checkpoint: step_3: a file differs; step_2: missing (traceback: ")
    else:
        assert err == ""
    log = (tmp_path / "logs" / f"error.rank{int(rank):05d}.txt").read_text()
    assert "Traceback" in log and "CheckpointError" in log


def test_an_error_one_rank_saw_is_said_by_that_rank(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    run_reporting_failures(_fail(KeyError("reward 'x'")), str(tmp_path))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megatron-cegppo: rank 3 (") and "KeyError" in err, err


def test_the_peers_broken_connections_stay_quiet(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    run_reporting_failures(_fail(RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234")), str(tmp_path))
    assert capsys.readouterr().err == ""
    assert (tmp_path / "logs" / "error.rank00001.txt").is_file()


def test_success_passes_the_status_through(tmp_path):
    assert run_reporting_failures(lambda: 3, str(tmp_path)) == 3
    assert not (tmp_path / "logs").exists()


def test_bad_input_found_at_start_up_exits_2(tmp_path, capsys):
    from megatron_cegppo.data.prompts import DataError

    assert run_reporting_failures(_fail(DataError("p.jsonl: 2 of 4 prompts are too long")), str(tmp_path)) == 2
    assert "2 of 4 prompts" in capsys.readouterr().err
