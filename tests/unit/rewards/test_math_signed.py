"""The CE-GPPO authors' math reward: +1 when math-verify finds the reference answer anywhere in
the whole response (boxed or not, as a string or mathematically equal), -1 otherwise; and the
correct score each registered reward declares (accuracy and the positive-sample NLL use it)."""

from __future__ import annotations

import pytest

from megatron_cegppo.rewards.math_verify_reward import MAX_RESPONSE_CHARS
from megatron_cegppo.rewards.registry import compute_rewards, register_reward, reward_correct_score


@pytest.mark.parametrize("response, answer, expected", [
    ("Adding, 2+3 gives \\boxed{5}.", "5", 1.0),
    ("<think>it might be 4, no</think> The answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),  # equal, not equal text
    ("The answer is 540.", "540", 1.0),  # no box: math-verify's plain extraction, as the authors score
    ("so \\boxed{7}", "8", -1.0),
    ("I do not know", "1", -1.0),
    ("", "1", -1.0),
    ("\\boxed{1}" + " " * MAX_RESPONSE_CHARS, "1", -1.0),  # too long to hand to sympy
])
def test_scores(response, answer, expected):
    assert compute_rewards("math_signed", [response], [answer]) == [expected]


def test_the_last_boxed_reward_differs_where_the_answer_is_not_boxed():
    assert compute_rewards("math", ["The answer is 540."], ["540"]) == [0.0]


def test_correct_scores():
    assert reward_correct_score("math") == 1.0 and reward_correct_score("math_signed") == 1.0
    register_reward("test_five_for_correct", correct_score=5.0)(lambda r, a: 5.0 * (r == a))
    assert reward_correct_score("test_five_for_correct") == 5.0
    with pytest.raises(ValueError, match="unknown reward 'nope'; registered rewards: .*math_signed"):
        reward_correct_score("nope")
