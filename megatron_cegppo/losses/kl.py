"""Per-token KL estimators for an optional reference-model penalty in the policy loss."""

from __future__ import annotations

import torch

KL_KINDS = ("k1", "k2", "k3")


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs:
    k1 = lp - ref, k2 = (lp - ref)^2 / 2, k3 = exp(ref - lp) - (ref - lp) - 1
    (k3 is non-negative and unbiased; written with expm1 so small ratios keep precision)."""
    if log_prob.shape != ref_log_prob.shape:
        raise ValueError(f"log_prob {tuple(log_prob.shape)} and ref_log_prob {tuple(ref_log_prob.shape)} differ")
    if kind == "k1":
        return log_prob - ref_log_prob
    if kind == "k2":
        return 0.5 * (log_prob - ref_log_prob).square()
    if kind == "k3":
        d = ref_log_prob - log_prob
        return torch.expm1(d) - d
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")
