"""Reward functions by name, and batch scoring that a bad response cannot crash."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Sequence

from .math_verify_reward import math_reward, math_signed_reward
from .synthetic import arithmetic_reward

RewardFn = Callable[[str, str], float]  # (response, answer) -> reward

_REWARDS: Dict[str, RewardFn] = {}
_CORRECT: Dict[str, float] = {}


def register_reward(name: str, *, correct_score: float = 1.0) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn`` under ``name``; a name cannot be taken twice.
    ``correct_score``: the reward of a correct response (accuracy, the positive-sample NLL)."""

    def decorator(fn: RewardFn) -> RewardFn:
        if name in _REWARDS and _REWARDS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered ({_REWARDS[name]!r})")
        _REWARDS[name] = fn
        _CORRECT[name] = float(correct_score)
        return fn

    return decorator


def reward_correct_score(name: str) -> float:
    """The reward ``name`` gives a correct response."""
    get_reward(name)  # an unknown name: the one message that lists the registered ones
    return _CORRECT[name]


def get_reward(name: str) -> RewardFn:
    try:
        return _REWARDS[name]
    except KeyError:
        raise ValueError(
            f"unknown reward {name!r}; registered rewards: {', '.join(sorted(_REWARDS))}"
        ) from None


def compute_rewards(name: str, responses: Sequence[str], answers: Sequence[str]) -> List[float]:
    """Scores ``responses[i]`` against ``answers[i]``. A reward function that raises or
    returns a non-number / non-finite value scores 0.0; such failures are reported in
    one warning per call, so a bad batch cannot stop training."""
    fn = get_reward(name)
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    rewards: List[float] = []
    failures, first_error = 0, None
    for response, answer in zip(responses, answers):
        try:
            value = float(fn(response, answer))
            if not math.isfinite(value):
                raise ValueError(f"non-finite reward {value}")
        except Exception as e:
            failures += 1
            first_error = first_error or e
            value = 0.0
        rewards.append(value)
    if failures:
        warnings.warn(
            f"reward {name!r} failed on {failures}/{len(rewards)} responses (scored 0.0); "
            f"first error: {first_error!r}",
            RuntimeWarning,
            stacklevel=2,
        )
    return rewards


register_reward("math")(math_reward)  # 1 / 0 on the last \boxed{} answer
register_reward("math_signed")(math_signed_reward)  # +1 / -1 on the whole response (the authors')
register_reward("arithmetic")(arithmetic_reward)
