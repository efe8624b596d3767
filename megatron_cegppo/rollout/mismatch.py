"""How far the rollout engine's log-probs are from the trainer's for the same sampled tokens
(different kernels, precisions and batch shapes make them differ), and the truncated
importance-sampling correction for it (Yao et al. 2025, "Your Efficient RL Framework Secretly
Brings You Off-Policy RL Training")."""

from __future__ import annotations

import torch


def logprob_mismatch(rollout_log_prob: torch.Tensor, train_log_prob: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean and max |difference| over response tokens, and a KL(rollout || trainer) estimate
    (k3 on tokens sampled from the rollout policy: non-negative, unbiased)."""
    mask = mask.bool()
    if not mask.any():
        return {"mismatch/abs_mean": 0.0, "mismatch/abs_max": 0.0, "mismatch/kl": 0.0}
    delta = (train_log_prob.float() - rollout_log_prob.float())[mask]
    k3 = torch.exp(delta) - delta - 1
    return {
        "mismatch/abs_mean": delta.abs().mean().item(),
        "mismatch/abs_max": delta.abs().max().item(),
        "mismatch/kl": k3.mean().item(),
    }


def truncated_importance_weights(train_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, cap: float) -> torch.Tensor:
    """``min(pi_train / pi_rollout, cap)`` per token, detached. Every policy loss here is
    positively homogeneous in the advantage per token, so multiplying the advantages by these
    weights applies the correction to any of them."""
    if cap <= 0:
        raise ValueError(f"the importance-weight cap must be > 0, got {cap}")
    return torch.exp(train_log_prob.detach().float() - rollout_log_prob.float()).clamp(max=cap)
