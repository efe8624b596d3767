"""The per-token pieces the clipped policy losses share: the importance ratio, which tokens
left the trust region, PPO's clipped surrogate and the dual clip.

Branches are selected with ``torch.where``; the decisions use the exact ratio, the values
that carry a gradient the clamped one (see :data:`LOG_RATIO_CLAMP`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = [
    "LOG_RATIO_CLAMP",
    "ratios",
    "unit_with_grad",
    "clip_masks",
    "clipped_surrogate",
    "dual_clip",
]

# Bound on the log-ratio that feeds ``r = exp(log_ratio)`` in the unclipped branch.
#
# The branches are selected with ``torch.where``.  Its backward passes a zero gradient to
# the branch that was not selected, and autograd then multiplies that zero by the
# branch's local derivative.  For ``-r * A`` that derivative is ``r``; if ``exp``
# overflowed (``log_ratio`` above ~88 in fp32) this is ``0 * inf = nan`` and the nan
# poisons the whole gradient, even though the token's loss came from another branch.
# Clamping keeps ``r`` finite.  It only changes tokens beyond +-20: with a negative
# advantage they sit far above any sane dual-clip bound (e^20 ~ 4.9e8), so their loss is
# the dual-clip constant anyway; with a positive advantage they are high-clipped; and on
# the low side r <= e^-20 ~ 2e-9, so the loss and gradient lost are negligible.
# Branch decisions (which token is clipped) use the exact, unclamped ratio.
LOG_RATIO_CLAMP = 20.0


def ratios(log_ratio: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(exact, clamped)`` ratio ``exp(log_ratio)``: the exact one is detached and may be
    0 or inf (only for decisions); the clamped one is finite and carries the gradient."""
    return torch.exp(log_ratio.detach()), torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def unit_with_grad(log_value: torch.Tensor) -> torch.Tensor:
    """``r / sg(r)`` for ``r = exp(log_value)``, computed as ``exp(log_value - sg(log_value))``.

    Its value is exactly 1 and its gradient is ``d log_value`` (for a log-ratio or a
    log-prob: the gradient of ``log_prob``).  Dividing ``r`` by ``r.detach()`` instead would
    give ``inf / inf = nan`` when ``r`` overflows.
    """
    return torch.exp(log_value - log_value.detach())


def clip_masks(
    ratio_exact: torch.Tensor,
    eps_low: Optional[float],
    eps_high: float,
    advantages: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bool ``(clipped_low, clipped_high)``: the ratio is below ``1 - eps_low`` / above
    ``1 + eps_high`` (``eps_low=None``: no lower bound).

    With ``advantages``, only the tokens the clip acts on: below with ``A < 0``, above with
    ``A > 0`` (where ``max(-A r, -A clip(r))`` is the clipped term).
    """
    high = ratio_exact > 1.0 + eps_high
    low = torch.zeros_like(high) if eps_low is None else ratio_exact < 1.0 - eps_low
    if advantages is not None:
        low = (advantages < 0) & low
        high = (advantages > 0) & high
    return low, high


def clipped_surrogate(
    advantages: torch.Tensor,
    ratio: torch.Tensor,
    clipped_low: torch.Tensor,
    clipped_high: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> torch.Tensor:
    """PPO's ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``, selected with the masks
    of :func:`clip_masks`: the same values and (away from exact ties) the same gradient as
    the max; clipped tokens have none."""
    return torch.where(
        clipped_low,
        -advantages * (1.0 - eps_low),
        torch.where(clipped_high, -advantages * (1.0 + eps_high), -advantages * ratio),
    )


def dual_clip(
    loss: torch.Tensor, advantages: torch.Tensor, clip_ratio_c: Optional[float]
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Caps the loss of negative-advantage tokens at ``-A * clip_ratio_c`` (a constant, no
    gradient). Returns ``(loss, dual_clipped)``; ``clip_ratio_c=None``: ``(loss, None)``."""
    if clip_ratio_c is None:
        return loss, None
    bound = -advantages * clip_ratio_c
    # strict '>' keeps the branch's own gradient at an exact tie
    dual_clipped = (advantages < 0) & (loss.detach() > bound)
    return torch.where(dual_clipped, bound, loss), dual_clipped
