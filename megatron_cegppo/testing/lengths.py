"""Long-tailed sequence-length distributions for the packing tests and benchmark: the shapes
RL responses take (most short, a few near the cap, many truncated at it)."""

from __future__ import annotations

import numpy as np


def lognormal_lengths(rng: np.random.Generator, n: int = 1024, cap: int = 16384) -> np.ndarray:
    """Log-normal around a median of 1024 tokens; the longest of 1024 is ~16x the median."""
    x = rng.lognormal(np.log(1024), 0.87, n)
    return np.clip(np.rint(x), 1, cap).astype(np.int64)


def bimodal_lengths(rng: np.random.Generator, n: int = 1024, cap: int = 16384) -> np.ndarray:
    """20% truncated at exactly ``cap`` tokens, the rest log-normal around 2048."""
    x = np.clip(np.rint(rng.lognormal(np.log(2048), 0.6, n)), 1, cap - 1).astype(np.int64)
    x[rng.random(n) < 0.2] = cap
    return x


DISTRIBUTIONS = {"lognormal": lognormal_lengths, "bimodal": bimodal_lengths}
