"""CE-GPPO: gradient-preserving clipping for entropy control.

Reference: Su et al., "CE-GPPO: Coordinating Entropy via Gradient-Preserving Clipping
Policy Optimization in Reinforcement Learning", arXiv 2509.20712 (2025).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Tuple, Union

import torch

from .clipping import LOG_RATIO_CLAMP, clip_masks, dual_clip, ratios, unit_with_grad
from .driver import LossOptions, compute_policy_loss
from .validation import check_clip_ratio_c, check_eps, check_nonneg

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["cegppo_loss", "cegppo_token_loss", "LOG_RATIO_CLAMP"]

Number = Union[int, float]


def cegppo_token_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta1: float = 0.5,
    beta2: float = 1.0,
    clip_ratio_c: float = 10.0,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-token CE-GPPO loss (no masking, no validation, no aggregation).

    Inputs must be finite; :func:`cegppo_loss` takes care of that.  Returns
    ``(loss_mat, branches)`` where ``branches`` holds bool tensors ``clipped_low``,
    ``clipped_high``, ``dual_clipped`` and the detached ``log_ratio``.
    """
    adv = advantages.detach()
    log_ratio = log_prob - old_log_prob.detach()
    ratio_exact, ratio = ratios(log_ratio)
    unit = unit_with_grad(log_ratio)
    clipped_low, clipped_high = clip_masks(ratio_exact, eps_low, eps_high, adv)

    loss_plain = -ratio * adv
    loss_low = -(beta1 * (1.0 - eps_low)) * unit * adv
    loss_high = -(beta2 * (1.0 + eps_high)) * unit * adv
    loss = torch.where(clipped_low, loss_low, torch.where(clipped_high, loss_high, loss_plain))
    loss, dual_clipped = dual_clip(loss, adv, clip_ratio_c)

    return loss, {
        "clipped_low": clipped_low,
        "clipped_high": clipped_high,
        "dual_clipped": dual_clipped,
        "log_ratio": log_ratio.detach(),
    }


def cegppo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eps_low: Number = 0.2,
    eps_high: Number = 0.2,
    beta1: Number = 0.5,
    beta2: Number = 1.0,
    clip_ratio_c: Number = 10.0,
    **options: Unpack[LossOptions],
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """CE-GPPO policy loss (Su et al. 2025, arXiv 2509.20712).

    PPO's clip zeroes the gradient of tokens whose ratio ``r = exp(lp - old_lp)`` left the
    trust region.  Those are mostly low-probability tokens, and dropping them biases the
    entropy: negative-advantage low-probability tokens would raise entropy, positive ones
    would lower it.  CE-GPPO keeps their gradient, bounded and scaled (``sg`` = stop
    gradient, ``A`` = advantage)::

        A < 0, r < 1 - eps_low :  loss = -beta1 * (1 - eps_low)  * r / sg(r) * A
        A > 0, r > 1 + eps_high:  loss = -beta2 * (1 + eps_high) * r / sg(r) * A
        otherwise              :  loss = -r * A
        A < 0 (dual clip)      :  loss = min(loss, -A * clip_ratio_c)

    ``r / sg(r)`` equals 1, so a clipped token's gradient is the PPO gradient at the
    clip boundary times beta.  ``beta1`` (low side) > 0 counters entropy collapse by
    keeping the push-down on bad low-probability tokens; ``beta2`` (high side) sets how
    strongly good low-probability tokens are reinforced.

    Paper settings: ``eps_low = eps_high = 0.2``, ``clip_ratio_c = 10``, ``beta1 = 0.5``
    (1.5B model) or ``0.75`` (7B), ``beta2 = 1.0``, token-mean aggregation.
    ``beta1 = beta2 = 0`` gives exactly PPO-clip's gradient (the value differs: clipped
    tokens contribute 0 instead of a constant); ``beta1 = beta2 = 1`` is GPPO
    (Klear-Reasoner, arXiv 2508.07629).

    Args:
        log_prob: ``[B, L]`` log-probs of the sampled tokens under the current policy
            (carries the gradient).
        old_log_prob: ``[B, L]`` log-probs under the behaviour policy.
        advantages: ``[B, L]`` per-token advantages.
        response_mask: ``[B, L]`` bool or 0/1 of any dtype; masked-out positions may hold
            any value, nan included, and get exactly zero gradient.
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``.
        beta1, beta2: gradient scale of the low / high clipped tokens (>= 0).
        clip_ratio_c: dual-clip constant (> 1).
        options: the keyword arguments every policy loss takes
            (:class:`~megatron_cegppo.losses.driver.LossOptions`):
        loss_agg_mode, normalizer: see :func:`~megatron_cegppo.losses.aggregate_loss`
            (default ``"token-mean"``, ``None``).
        entropy: optional ``[B, L]`` entropy of the current policy, used only for the
            quadrant metrics (a token is low-probability when ``lp < -entropy``).
        hp_threshold: without ``entropy``, a token is low-probability when
            ``exp(lp) < hp_threshold`` (default 0.5).
        check_finite: check that inputs are finite at valid positions (one host sync;
            default True).

    Returns:
        ``(loss, metrics)``: 0-dim loss (dtype ``promote(inputs, float32)``) and a dict of
        detached float32 0-dim tensors (see :mod:`megatron_cegppo.losses.statistics`).
    """
    check_eps("eps_low", eps_low, upper_one=True)
    check_eps("eps_high", eps_high, upper_one=False)
    check_nonneg("beta1", beta1)
    check_nonneg("beta2", beta2)
    check_clip_ratio_c(clip_ratio_c, allow_none=False)
    loss, metrics, _, _ = compute_policy_loss(
        lambda lp, old, adv, mask: cegppo_token_loss(
            lp, old, adv, eps_low=float(eps_low), eps_high=float(eps_high),
            beta1=float(beta1), beta2=float(beta2), clip_ratio_c=float(clip_ratio_c),
        ),
        log_prob, old_log_prob, advantages, response_mask, **options,
    )
    return loss, metrics
