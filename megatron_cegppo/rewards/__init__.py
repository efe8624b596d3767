"""Rule-based rewards: ``(response, answer) -> float`` functions looked up by name."""

from .math_verify_reward import MAX_ANSWER_CHARS, extract_boxed, math_reward, shutdown_math_worker
from .registry import compute_rewards, get_reward, register_reward
from .synthetic import ArithmeticTask, arithmetic_reward, make_arithmetic_dataset

__all__ = [
    "MAX_ANSWER_CHARS",
    "extract_boxed",
    "math_reward",
    "shutdown_math_worker",
    "compute_rewards",
    "get_reward",
    "register_reward",
    "ArithmeticTask",
    "arithmetic_reward",
    "make_arithmetic_dataset",
]
