"""The validation measures: avg@k and pass@k over problems (a problem repeated in a file counts
once, as the authors' mean@32 does), when validation is due, and the preflight of the files."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from megatron_cegppo.config import load_config, problems
from megatron_cegppo.preflight import file_problems
from megatron_cegppo.trainer.validation_phase import InRunValidation
from megatron_cegppo.validation import Scored, ValidationSet, accuracy, summarize


def test_repeated_rows_are_one_problem_sampled_more():
    # problem 0: 4 rows, 3 right; problem 1: 1 row, wrong
    avg, passed, samples = accuracy([0, 0, 1, 0, 0], [[True], [False], [False], [True], [True]])
    assert avg == pytest.approx((3 / 4 + 0) / 2) and passed == 0.5 and samples == 1
    avg, passed, samples = accuracy([0, 1], [[True, False, False], [False, False, False]])
    assert avg == pytest.approx(1 / 6) and passed == 0.5 and samples == 3


def test_summary_names_the_set_and_checks_every_row_was_sampled():
    vset = ValidationSet("aime24", "aime24.json", [{"answer": "1"}] * 2, [[1], [1]], [0, 0], 0, "")
    parts = [Scored([0], [], [1.0]), Scored([1], [], [-1.0])]
    assert summarize(vset, parts, k=1, correct_score=1.0) == {"val/aime24/avg@2": 0.5, "val/aime24/pass@2": 1.0}
    with pytest.raises(RuntimeError, match="not every row got its 1 sample"):
        summarize(vset, parts[:1], k=1, correct_score=1.0)


@pytest.mark.parametrize("every, before, expected", [
    (0, True, [0]), (0, False, []), (2, True, [0, 2, 4, 5]), (2, False, [2, 4, 5]),
])
def test_when_validation_is_due(every, before, expected):
    cfg = SimpleNamespace(validation=SimpleNamespace(every=every, before_training=before))
    v = InRunValidation.__new__(InRunValidation)
    v.cfg, v.sets = cfg, ["a set"]
    assert [s for s in range(6) if v.due(s, last=s == 5)] == expected
    v.sets = []
    assert not any(v.due(s, last=s == 5) for s in range(6))


def test_settings_and_files_are_checked_up_front(tmp_path):
    ok = tmp_path / "aime.json"
    ok.write_text(json.dumps({"prompt": [{"role": "user", "content": "x"}], "reward_model": {"ground_truth": "1"}}))
    common = ["model.path=m", "data.train_path=d.jsonl", "data.answer_key=reward_model.ground_truth",
              f"validation.datasets=[{ok}, {tmp_path / 'missing.json'}]"]
    found = problems(load_config(None, common + ["validation.k=0", "validation.top_p=0"]))
    assert {"validation.k must be >= 1, got 0", "validation.top_p must be in (0, 1], got 0.0"} <= set(found), found
    cfg = load_config(None, common + ["validation.max_tokens=4096", "rollout.max_model_len=2048"])
    assert any("must exceed validation.max_tokens (4096)" in p for p in problems(cfg)), problems(cfg)
    files = file_problems(cfg)
    assert f"validation.datasets[1]: {tmp_path / 'missing.json'} does not exist" in files
    assert not any("validation.datasets[0]" in p for p in files), files
