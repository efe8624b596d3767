"""Diagnostics reported next to every policy loss.

All values are detached, float32, 0-dim tensors computed on the inputs' device without
host syncs, so they can be accumulated and reduced later in one go.  Every fraction is
taken over the valid (mask true) tokens of the batch and is 0 for an all-masked batch.

Keys (not every loss reports every key):

* ``clipfrac_low`` / ``clipfrac_high`` / ``clipfrac``: tokens in the loss's low / high /
  either clipped branch.
* ``dualclip_frac``: negative-advantage tokens whose loss was capped by the dual-clip
  bound ``-A * clip_ratio_c``.
* ``approx_kl``: masked mean of ``old_lp - lp`` (k1 estimator of KL(old || new)).
* ``approx_kl_k3``: masked mean of ``r - 1 - log r`` (k3 estimator, always >= 0).
* ``ratio_mean`` / ``ratio_max``: importance ratio ``exp(lp - old_lp)`` on valid tokens.
* ``num_tokens``: number of valid tokens.
* ``pg_loss``: the aggregated loss value.
* ``quadrant/{pa,na}_{hp,lp}_frac``: share of valid tokens in each advantage-sign /
  probability quadrant (PA: A > 0, NA: A < 0; tokens with A == 0 are in no quadrant),
  ``quadrant/..._clipped``: number of that quadrant's tokens that were clipped (low or
  high), ``quadrant/..._clipped_frac``: clipped / quadrant size (0 when empty).

HP/LP: with ``entropy`` (per-position entropy of the current policy) a token is LP when
``log_prob < -entropy``, i.e. its probability is below ``exp(-H)``.  Raising such a token's
probability increases the entropy to first order (the entropy change is driven by the
covariance between log-probability and advantage; Cui et al. 2025, "The Entropy Mechanism
of Reinforcement Learning for Reasoning Language Models", arXiv 2505.22617), which is the
regime CE-GPPO's clipped-gradient terms act on.  Without ``entropy`` a token is LP when
``exp(log_prob) < hp_threshold``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

__all__ = [
    "QUADRANTS",
    "masked_sum",
    "masked_mean",
    "masked_max",
    "fraction",
    "low_prob_mask",
    "ratio_metrics",
    "quadrant_metrics",
    "clip_metrics",
    "policy_metrics",
]

QUADRANTS = ("pa_hp", "pa_lp", "na_hp", "na_lp")

Metrics = Dict[str, torch.Tensor]


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float32)


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = _f32(x)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()


def _count(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum().to(torch.float32)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask`` (0 when the mask is empty)."""
    return masked_sum(x, mask) / _count(mask).clamp(min=1.0)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max of ``x`` over ``mask`` (0 when the mask is empty)."""
    x = _f32(x)
    neg_inf = torch.full((), float("-inf"), dtype=x.dtype, device=x.device)
    m = torch.where(mask, x, neg_inf).amax() if x.numel() else neg_inf
    return torch.where(mask.any(), m, torch.zeros_like(m))


def fraction(sel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of valid tokens where ``sel`` holds."""
    return _count(sel & mask) / _count(mask).clamp(min=1.0)


def ratio_metrics(log_ratio: torch.Tensor, mask: torch.Tensor) -> Metrics:
    """KL estimates and ratio statistics from the per-token log-ratio ``lp - old_lp``."""
    lr = _f32(log_ratio)
    # Masked positions are replaced before exp so that garbage there cannot produce nan.
    lr = torch.where(mask, lr, torch.zeros((), dtype=lr.dtype, device=lr.device))
    ratio = torch.exp(lr)
    return {
        "approx_kl": masked_mean(-lr, mask),
        "approx_kl_k3": masked_mean(ratio - 1.0 - lr, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max": masked_max(ratio, mask),
        "num_tokens": _count(mask),
    }


def low_prob_mask(
    log_prob: torch.Tensor,
    mask: torch.Tensor,
    entropy: Optional[torch.Tensor] = None,
    hp_threshold: float = 0.5,
) -> torch.Tensor:
    """Bool tensor: token is low-probability (see module docstring for the criterion)."""
    # Compared in the inputs' own precision (at least fp32), only counts are cast.
    lp = log_prob.detach()
    dtype = torch.promote_types(lp.dtype, torch.float32)
    if entropy is not None:
        dtype = torch.promote_types(dtype, entropy.dtype)
    lp = lp.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=lp.device)
    lp = torch.where(mask, lp, zero)
    if entropy is not None:
        ent = torch.where(mask, entropy.detach().to(dtype), zero)
        return lp < -ent
    return torch.exp(lp) < hp_threshold


def quadrant_metrics(
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clipped: torch.Tensor,
    *,
    entropy: Optional[torch.Tensor] = None,
    hp_threshold: float = 0.5,
) -> Metrics:
    """Token shares and clip counts per (advantage sign, probability) quadrant."""
    adv = advantages.detach()
    pos = (adv > 0) & mask
    neg = (adv < 0) & mask
    low = low_prob_mask(log_prob, mask, entropy, hp_threshold)
    total = _count(mask).clamp(min=1.0)
    groups = {
        "pa_hp": pos & ~low,
        "pa_lp": pos & low,
        "na_hp": neg & ~low,
        "na_lp": neg & low,
    }
    out: Metrics = {}
    for name in QUADRANTS:
        sel = groups[name]
        n = _count(sel)
        n_clip = _count(sel & clipped)
        out[f"quadrant/{name}_frac"] = n / total
        out[f"quadrant/{name}_clipped"] = n_clip
        out[f"quadrant/{name}_clipped_frac"] = n_clip / n.clamp(min=1.0)
    return out


def clip_metrics(
    mask: torch.Tensor,
    clipped_low: torch.Tensor,
    clipped_high: torch.Tensor,
    dual_clipped: Optional[torch.Tensor] = None,
) -> Metrics:
    """``clipfrac_low``, ``clipfrac_high``, ``clipfrac`` and (if given) ``dualclip_frac``."""
    out: Metrics = {
        "clipfrac_low": fraction(clipped_low, mask),
        "clipfrac_high": fraction(clipped_high, mask),
        "clipfrac": fraction(clipped_low | clipped_high, mask),
    }
    if dual_clipped is not None:
        out["dualclip_frac"] = fraction(dual_clipped, mask)
    return out


def policy_metrics(
    *,
    loss: torch.Tensor,
    log_prob: torch.Tensor,
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clipped_low: torch.Tensor,
    clipped_high: torch.Tensor,
    dual_clipped: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    hp_threshold: float = 0.5,
) -> Metrics:
    """The full metric set of a clipped policy loss (see module docstring)."""
    out: Metrics = {"pg_loss": _f32(loss).reshape(())}
    out.update(clip_metrics(mask, clipped_low, clipped_high, dual_clipped))
    out.update(ratio_metrics(log_ratio, mask))
    out.update(
        quadrant_metrics(
            log_prob,
            advantages,
            mask,
            clipped_low | clipped_high,
            entropy=entropy,
            hp_threshold=hp_threshold,
        )
    )
    return out
