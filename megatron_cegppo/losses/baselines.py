"""Baseline policy losses with the same calling convention as :func:`cegppo_loss`.

* :func:`ppo_clip_loss`: PPO / GRPO clipped surrogate, optional dual clip, asymmetric
  clip range (DAPO clip-higher).
* :func:`cispo_loss`: CISPO (MiniMax-M1), clipped and detached importance weights.
* :func:`gspo_loss`: GSPO, sequence-level importance ratio.

All of them: ``fn(log_prob, old_log_prob, advantages, response_mask, *, ...,
loss_agg_mode, normalizer, entropy, hp_threshold, check_finite) -> (loss, metrics)``.
Branches are selected with ``torch.where`` and ratios that feed a loss value are computed
from a log-ratio clamped to ``+-LOG_RATIO_CLAMP`` (see :mod:`.clipping` for why), while the
clip decisions use the exact ratio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple, Union

import torch

from .clipping import clip_masks, clipped_surrogate, dual_clip, ratios, unit_with_grad
from .driver import LossOptions, compute_policy_loss
from .statistics import masked_max
from .validation import check_clip_ratio_c, check_eps

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "ppo_clip_loss",
    "ppo_clip_token_loss",
    "cispo_loss",
    "cispo_token_loss",
    "gspo_loss",
    "gspo_token_loss",
]

Number = Union[int, float]
Result = Tuple[torch.Tensor, Dict[str, torch.Tensor]]


# --------------------------------------------------------------------------------------
# PPO / GRPO / DAPO
# --------------------------------------------------------------------------------------


def ppo_clip_token_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_ratio_c: Optional[float] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-token clipped surrogate (inputs finite, no masking).

    ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` selects the clipped term exactly
    when ``A < 0, r < 1 - eps_low`` or ``A > 0, r > 1 + eps_high``; the selection is done
    with those conditions, which gives the same values and (away from exact ties) the
    same gradient as the max.
    """
    adv = advantages.detach()
    log_ratio = log_prob - old_log_prob.detach()
    ratio_exact, ratio = ratios(log_ratio)
    clipped_low, clipped_high = clip_masks(ratio_exact, eps_low, eps_high, adv)
    loss = clipped_surrogate(adv, ratio, clipped_low, clipped_high, eps_low, eps_high)
    loss, dual_clipped = dual_clip(loss, adv, clip_ratio_c)
    return loss, {
        "clipped_low": clipped_low,
        "clipped_high": clipped_high,
        "dual_clipped": dual_clipped,
        "log_ratio": log_ratio.detach(),
    }


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eps_low: Number = 0.2,
    eps_high: Number = 0.2,
    clip_ratio_c: Optional[Number] = None,
    **options: Unpack[LossOptions],
) -> Result:
    """PPO-clip / GRPO policy loss with optional dual clip and asymmetric clip range.

    ``loss_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` with
    ``r = exp(lp - old_lp)``; with ``clip_ratio_c`` set, negative-advantage tokens are
    further capped: ``loss_t = min(loss_t, -A * clip_ratio_c)``.

    References: PPO (Schulman et al. 2017, arXiv 1707.06347); GRPO (Shao et al. 2024,
    DeepSeekMath, arXiv 2402.03300) uses this surrogate with group-relative advantages;
    dual clip (Ye et al. 2020, arXiv 1912.09729); ``eps_high > eps_low`` is DAPO's
    clip-higher (Yu et al. 2025, arXiv 2503.14476; they use 0.2 / 0.28 with token-mean).

    Clipped tokens have zero gradient.  Without dual clip, a negative-advantage token
    whose log-ratio exceeds ``LOG_RATIO_CLAMP`` gets the loss at the clamp and no
    gradient (the exact gradient would exceed ``4.9e8 * |A|``).

    Other arguments and the return value are as in :func:`cegppo_loss`.
    """
    check_eps("eps_low", eps_low, upper_one=True)
    check_eps("eps_high", eps_high, upper_one=False)
    check_clip_ratio_c(clip_ratio_c, allow_none=True)
    c = None if clip_ratio_c is None else float(clip_ratio_c)
    loss, metrics, _, _ = compute_policy_loss(
        lambda lp, old, adv, mask: ppo_clip_token_loss(
            lp, old, adv, eps_low=float(eps_low), eps_high=float(eps_high), clip_ratio_c=c
        ),
        log_prob, old_log_prob, advantages, response_mask, **options,
    )
    return loss, metrics


# --------------------------------------------------------------------------------------
# CISPO
# --------------------------------------------------------------------------------------


def cispo_token_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: Optional[float] = None,
    eps_high: float = 0.28,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-token CISPO loss ``-sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * lp``."""
    adv = advantages.detach()
    log_ratio = (log_prob - old_log_prob.detach()).detach()
    ratio_exact = torch.exp(log_ratio)
    weight = ratio_exact.clamp(max=1.0 + eps_high)
    if eps_low is not None:
        weight = weight.clamp(min=1.0 - eps_low)
    clipped_low, clipped_high = clip_masks(ratio_exact, eps_low, eps_high)
    loss = -weight * adv * log_prob
    return loss, {
        "clipped_low": clipped_low,
        "clipped_high": clipped_high,
        "weight": weight,
        "log_ratio": log_ratio,
    }


def cispo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eps_low: Optional[Number] = None,
    eps_high: Number = 0.28,
    **options: Unpack[LossOptions],
) -> Result:
    """CISPO policy loss (MiniMax-M1, arXiv 2506.13585).

    ``loss_t = -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * lp``: the importance weight
    is truncated and detached instead of clipping the update, so every token keeps a
    gradient ``-weight * A * d lp`` (none is dropped).  ``eps_low=None`` (default) means
    no lower bound, as in the paper, which tunes only the upper bound.

    The loss value is a REINFORCE-style surrogate and is not comparable in magnitude to
    the ratio-based losses; compare gradients, not values.

    Metrics: ``clipfrac_high`` / ``clipfrac_low`` / ``clipfrac`` count tokens whose weight
    was truncated; the quadrant ``clipped`` counts use the same tokens.
    """
    check_eps("eps_low", eps_low, upper_one=True, allow_none=True)
    check_eps("eps_high", eps_high, upper_one=False)
    low = None if eps_low is None else float(eps_low)
    loss, metrics, _, _ = compute_policy_loss(
        lambda lp, old, adv, mask: cispo_token_loss(lp, old, adv, eps_low=low, eps_high=float(eps_high)),
        log_prob, old_log_prob, advantages, response_mask, **options,
    )
    return loss, metrics


# --------------------------------------------------------------------------------------
# GSPO
# --------------------------------------------------------------------------------------


def gspo_token_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-token GSPO-token loss (inputs finite; ``mask`` bool, used for the seq ratio).

    ``s_i = exp(mean_valid(lp - old_lp))``, ``s_it = sg(s_i) * exp(lp - sg(lp))`` and
    ``loss_t = max(-A s_it, -A clip(s_it, 1 - eps_low, 1 + eps_high))``; the max is
    selected with the sign of ``A`` and the exact ``s_i`` (``s_it == s_i`` in value).
    """
    adv = advantages.detach()
    log_ratio = (log_prob - old_log_prob.detach()).detach()
    zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
    n_valid = mask.sum(dim=-1)
    seq_log_ratio = torch.where(mask, log_ratio, zero).sum(dim=-1) / n_valid.clamp(min=1).to(
        log_ratio.dtype
    )
    seq_ratio_exact, seq_ratio = (r.unsqueeze(-1) for r in ratios(seq_log_ratio))
    s_tok = seq_ratio * unit_with_grad(log_prob)
    clipped_low, clipped_high = clip_masks(seq_ratio_exact, eps_low, eps_high, adv)
    loss = clipped_surrogate(adv, s_tok, clipped_low, clipped_high, eps_low, eps_high)
    return loss, {
        "clipped_low": clipped_low,
        "clipped_high": clipped_high,
        "log_ratio": log_ratio,
        "seq_log_ratio": seq_log_ratio,
        "seq_valid": n_valid > 0,
    }


def gspo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eps_low: Number = 3e-4,
    eps_high: Number = 4e-4,
    **options: Unpack[LossOptions],
) -> Result:
    """GSPO policy loss (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071).

    The importance ratio is defined per sequence as the length-normalised likelihood
    ratio ``s_i = exp(mean over valid tokens of (lp - old_lp))`` and the whole sequence is
    clipped together (the paper's ranges are tiny: 3e-4 / 4e-4).  The token form
    ``s_it = sg(s_i) * exp(lp - sg(lp))`` (GSPO-token) has the value ``s_i`` and the
    gradient ``s_i * d lp``, so with advantages constant per sequence (as in GRPO-style
    group advantages) and ``seq-mean-token-mean`` aggregation it equals sequence-level
    GSPO, while allowing per-token advantages.

    Metrics: ``clipfrac*`` are fractions of valid tokens in clipped (sequence, token)
    positions; ``seq_ratio_mean`` / ``seq_ratio_max`` summarise ``s_i`` over valid
    sequences; ``ratio_*`` and the KL estimates are token-level.

    Other arguments are as in :func:`cegppo_loss`, except that ``loss_agg_mode`` defaults
    to ``"seq-mean-token-mean"``.
    """
    check_eps("eps_low", eps_low, upper_one=True)
    check_eps("eps_high", eps_high, upper_one=False)
    options.setdefault("loss_agg_mode", "seq-mean-token-mean")  # GSPO's sequence-level average
    loss, metrics, br, _ = compute_policy_loss(
        lambda lp, old, adv, mask: gspo_token_loss(
            lp, old, adv, mask, eps_low=float(eps_low), eps_high=float(eps_high)
        ),
        log_prob, old_log_prob, advantages, response_mask, **options,
    )
    seq_valid = br["seq_valid"]
    seq_ratio = torch.exp(br["seq_log_ratio"].to(torch.float32))
    n_seq = seq_valid.sum().to(torch.float32)
    metrics["seq_ratio_mean"] = (
        torch.where(seq_valid, seq_ratio, torch.zeros_like(seq_ratio)).sum() / n_seq.clamp(min=1.0)
    )
    metrics["seq_ratio_max"] = masked_max(seq_ratio, seq_valid)
    return loss, metrics
