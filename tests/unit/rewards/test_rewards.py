"""Rewards: boxed extraction, math-verify equivalence, the time bound, the synthetic task,
and the registry's failure handling."""

import random
import re
import threading
import time
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import megatron_cegppo.rewards.math_verify_reward as mvr
from megatron_cegppo.rewards import (
    ArithmeticTask,
    arithmetic_reward,
    compute_rewards,
    extract_boxed,
    get_reward,
    make_arithmetic_dataset,
    math_reward,
    register_reward,
)
from megatron_cegppo.rewards import registry

SLACK_S = 1.5  # safety margin for a loaded CI machine; not a benchmark


@pytest.fixture
def warm_worker():
    """Worker started before timing, so start-up cost is not measured as check time."""
    mvr.call_bounded("os:getpid", (), 60)


# ---- extraction -------------------------------------------------------------------------

@pytest.mark.parametrize("text, which, expected", [
    (r"\boxed{1} and \boxed{2}", "last", "2"),
    (r"\boxed{1} and \boxed{2}", "first", "1"),
    (r"x = \boxed{\frac{1}{\sqrt{4}}}.", "last", r"\frac{1}{\sqrt{4}}"),
    (r"\boxed{\{1,2\}}", "last", r"\{1,2\}"),           # escaped braces do not nest
    (r"\boxed{\left\{ x \mid x > 0 \right.}", "last", r"\left\{ x \mid x > 0 \right."),
    (r"\boxed {7}", "last", "7"),
    (r"\boxed{3} then \boxed{4", "last", "3"),             # truncated answer is not an answer
    (r"}}} \boxed{5} {{{", "last", "5"),                   # stray braces around
    ("no answer here", "last", None),
    (r"\boxed{", "last", None),
    ("", "first", None),
])
def test_extract_boxed(text, which, expected):
    assert extract_boxed(text, which) == expected


def test_extract_boxed_rejects_bad_which():
    with pytest.raises(ValueError, match="first"):
        extract_boxed("x", "middle")


# ---- math reward ------------------------------------------------------------------------

@pytest.mark.parametrize("response, answer", [
    (r"so the answer is \boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{2}", "2.0"),
    (r"\boxed{82}", "82"),
    (r"\boxed{\sqrt{2}}", r"\sqrt 2"),
    (r"\boxed{\frac{1}{\sqrt{4}}}", "0.5"),                # nested braces
    (r"first \boxed{7}, corrected: \boxed{-8}", "-8"),     # last boxed wins
])
def test_math_reward_equivalent(response, answer):
    assert math_reward(response, answer) == 1.0


@pytest.mark.parametrize("response, answer", [
    (r"\boxed{3}", "4"),
    (r"\boxed{\frac{1}{3}}", "0.5"),
    (r"\boxed{-8} then \boxed{7}", "-8"),                  # only the last one counts
    ("the answer is 82", "82"),                            # no \boxed{}
    (r"\boxed{}", "0"),
    (r"\boxed{82", "82"),
])
def test_math_reward_wrong_or_missing(response, answer):
    assert math_reward(response, answer) == 0.0


def test_math_reward_overlong_answer_not_checked(monkeypatch):
    monkeypatch.setattr(mvr, "call_bounded", lambda *a, **k: pytest.fail("sent to the worker"))
    assert math_reward(r"\boxed{" + "1" * (mvr.MAX_ANSWER_CHARS + 1) + "}", "1") == 0.0


@pytest.mark.parametrize("response", [
    r"\boxed{" * 150_000,                                  # ~1 MB, never closed
    "x" * 1_000_000 + r"\boxed{2",
    r"\boxed{" + "9" * 1_000_000 + "}",                    # 1 MB boxed content
    "{" * 500_000 + "}" * 500_000,
    "\\" * 1_000_000,
    "\x00\ud800\U0010ffff" + r"\boxed{\x\y\z}",
])
def test_math_reward_garbage_is_zero_and_bounded(response, warm_worker):
    start = time.monotonic()
    assert math_reward(response, "2", timeout_s=2.0) == 0.0
    assert time.monotonic() - start < 2.0 + SLACK_S


def test_math_reward_long_prefix_still_scored(warm_worker):
    assert math_reward("x" * 1_000_000 + r"\boxed{2}", "2") == 1.0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60), boxed=st.booleans())
def test_math_reward_random_unicode(text, boxed, warm_worker):
    response = r"\boxed{" + text + "}" if boxed else text
    start = time.monotonic()
    value = math_reward(response, "2", timeout_s=2.0)
    assert value in (0.0, 1.0)
    assert time.monotonic() - start < 2.0 + SLACK_S


def test_time_bound_on_slow_input(warm_worker):
    # A power tower sends sympy into a huge big-integer computation.
    start = time.monotonic()
    assert math_reward(r"\boxed{9^{9^{9^{9}}}}", "2", timeout_s=0.5) == 0.0
    assert time.monotonic() - start < 0.5 + SLACK_S
    assert math_reward(r"\boxed{2}", "2") == 1.0           # a fresh worker takes over


def _slow_check_module(tmp_path, monkeypatch):
    (tmp_path / "slow_check_mod.py").write_text(
        "import time\n\ndef check(pred, answer, lib_timeout):\n    time.sleep(60)\n    return True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mvr.shutdown_math_worker()                             # the next worker sees tmp_path
    monkeypatch.setattr(mvr, "_CHECK_TARGET", "slow_check_mod:check")
    mvr.call_bounded("os:getpid", (), 60)


@pytest.mark.parametrize("in_thread", [False, True])
def test_time_bound_fires_on_sleeping_check(tmp_path, monkeypatch, in_thread):
    _slow_check_module(tmp_path, monkeypatch)
    out = {}

    def run():
        start = time.monotonic()
        out["value"] = math_reward(r"\boxed{2}", "2", timeout_s=0.5)
        out["elapsed"] = time.monotonic() - start

    if in_thread:
        t = threading.Thread(target=run)
        t.start()
        t.join(10)
    else:
        run()
    assert out["value"] == 0.0
    assert 0.45 <= out["elapsed"] < 0.5 + SLACK_S         # it waited for the bound, then stopped
    mvr.shutdown_math_worker()


def test_worker_error_is_zero(monkeypatch, warm_worker):
    monkeypatch.setattr(mvr, "_CHECK_TARGET", "math:sqrt")  # TypeError inside the worker
    assert math_reward(r"\boxed{2}", "2") == 0.0


# ---- synthetic task ---------------------------------------------------------------------

def test_arithmetic_dataset_deterministic_and_correct():
    a = make_arithmetic_dataset(50, seed=3, digits=2, ops=("+", "-", "*"))
    assert a == make_arithmetic_dataset(50, seed=3, digits=2, ops=("+", "-", "*"))
    assert a != make_arithmetic_dataset(50, seed=4, digits=2, ops=("+", "-", "*"))
    ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
    for rec in a:
        m = re.fullmatch(r"(\d+)([+*-])(\d+)=", rec["prompt"])
        assert m, rec
        x, op, y = int(m[1]), m[2], int(m[3])
        assert 10 <= x <= 99 and 10 <= y <= 99
        assert rec["answer"] == str(ops[op](x, y))
    assert {re.search(r"[+*-]", r["prompt"])[0] for r in a} == {"+", "-", "*"}


def test_arithmetic_task_digits_and_validation():
    task = ArithmeticTask(seed=0, digits=1)
    values = {int(task.sample()["prompt"].split("+")[0]) for _ in range(300)}
    assert values == set(range(10))
    assert make_arithmetic_dataset(1, seed=0)[0]["prompt"].endswith("=")
    with pytest.raises(ValueError, match="ops"):
        ArithmeticTask(seed=0, ops=("/",))
    with pytest.raises(ValueError, match="digits"):
        ArithmeticTask(seed=0, digits=0)


@pytest.mark.parametrize("response, answer, expected", [
    (r"\boxed{82}", "82", 1.0),
    (r" \boxed{ 82 } ", " 82\n", 1.0),
    (r"\boxed{82} \boxed{1}", "82", 1.0),                 # first boxed counts
    (r"\boxed{1} \boxed{82}", "82", 0.0),
    (r"\boxed{83}", "82", 0.0),
    (r"\boxed{082}", "82", 0.0),                           # exact match, no maths
    ("82", "82", 0.0),
    (r"\boxed{82", "82", 0.0),
])
def test_arithmetic_reward(response, answer, expected):
    assert arithmetic_reward(response, answer) == expected


# ---- registry ---------------------------------------------------------------------------

def test_registry_builtins_and_unknown():
    assert get_reward("math") is math_reward
    assert get_reward("arithmetic") is arithmetic_reward
    with pytest.raises(ValueError, match=r"'nope'.*arithmetic, math"):
        get_reward("nope")


def test_register_reward(monkeypatch):
    monkeypatch.setattr(registry, "_REWARDS", dict(registry._REWARDS))

    @register_reward("const")
    def const(response, answer):
        return 0.25

    assert get_reward("const") is const
    assert compute_rewards("const", ["a", "b"], ["x", "y"]) == [0.25, 0.25]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("const")(lambda r, a: 1.0)


def test_compute_rewards_never_raises_for_bad_responses(monkeypatch):
    monkeypatch.setattr(registry, "_REWARDS", dict(registry._REWARDS))

    @register_reward("fragile")
    def fragile(response, answer):
        if response == "boom":
            raise RuntimeError("bad response")
        return float("nan") if response == "nan" else 1.0

    with pytest.warns(RuntimeWarning, match=r"2/4 responses.*bad response") as record:
        out = compute_rewards("fragile", ["ok", "boom", "nan", "ok"], ["", "", "", ""])
    assert out == [1.0, 0.0, 0.0, 1.0]
    assert len(record) == 1                                # one warning per call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compute_rewards("fragile", ["ok"], [""]) == [1.0]
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        compute_rewards("fragile", ["a", "b"], ["x"])


def test_compute_rewards_arithmetic_matches_fn():
    rng = random.Random(0)
    data = make_arithmetic_dataset(20, seed=1)
    responses = [r"\boxed{" + (d["answer"] if rng.random() < 0.5 else "0") + "}" for d in data]
    answers = [d["answer"] for d in data]
    assert compute_rewards("arithmetic", responses, answers) == [
        arithmetic_reward(r, a) for r, a in zip(responses, answers)
    ]
    assert 0 < sum(compute_rewards("arithmetic", responses, answers)) < 20
