"""The demo task: integer arithmetic prompts ("37+45=") with an exact-match reward, cheap
enough to train and score on CPU."""

from __future__ import annotations

import operator
import random
from typing import Dict, List, Sequence

from .math_verify_reward import extract_boxed

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


class ArithmeticTask:
    """Seeded stream of ``a<op>b=`` problems with ``digits``-digit operands."""

    def __init__(self, seed: int, digits: int = 2, ops: Sequence[str] = ("+",)) -> None:
        if not isinstance(digits, int) or digits < 1:
            raise ValueError(f"digits must be a positive int, got {digits!r}")
        ops = tuple(ops)
        unknown = [op for op in ops if op not in _OPS]
        if not ops or unknown:
            raise ValueError(f"ops must be a non-empty subset of {sorted(_OPS)}, got {ops!r}")
        self.digits, self.ops = digits, ops
        # Single-digit operands include 0; wider ones have no leading zero.
        self._low = 0 if digits == 1 else 10 ** (digits - 1)
        self._high = 10 ** digits - 1
        self._rng = random.Random(seed)

    def sample(self) -> Dict[str, str]:
        a = self._rng.randint(self._low, self._high)
        b = self._rng.randint(self._low, self._high)
        op = self._rng.choice(self.ops)
        return arithmetic_problem(a, b, op)


def arithmetic_problem(a: int, b: int, op: str = "+") -> Dict[str, str]:
    """The problem ``a<op>b=`` and its answer, in the task's format."""
    return {"prompt": f"{a}{op}{b}=", "answer": str(_OPS[op](a, b))}


def written_addition(a: int, b: int) -> str:
    """The column-by-column working of ``a+b``, least significant column first, each column's
    carry written as ``+1``: ``written_addition(457, 368) == "7+8=15,5+6+1=12,4+3+1=8,"``.
    The longer-answer task's warm-up target before its ``\\boxed{}`` answer; the reward
    still looks only at the answer, so RL may change the working."""
    if a < 0 or b < 0:
        raise ValueError(f"written_addition takes non-negative operands, got {a}, {b}")
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        terms = [d[i] for d in (da, db) if i < len(d)] + (["1"] if carry else [])
        total = sum(int(t) for t in terms)
        steps.append(f"{'+'.join(terms)}={total},")
        carry = total // 10
    return "".join(steps)


def make_arithmetic_dataset(
    n: int, seed: int, digits: int = 2, ops: Sequence[str] = ("+",)
) -> List[Dict[str, str]]:
    """``n`` problems, identical for identical arguments."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    task = ArithmeticTask(seed, digits=digits, ops=ops)
    return [task.sample() for _ in range(n)]


def arithmetic_reward(response: str, answer: str) -> float:
    """1.0 when the first ``\\boxed{...}`` of ``response`` is exactly ``answer`` (both
    stripped), else 0.0. No sympy: string comparison only."""
    got = extract_boxed(response, "first")
    return 1.0 if got is not None and got.strip() == str(answer).strip() else 0.0
