"""The steps every policy loss shares: validate, sanitize masked positions, per-token loss,
aggregate, statistics."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, TypedDict, Union

import torch

from .aggregation import aggregate_loss
from .statistics import policy_metrics
from .validation import sanitize_inputs, validate_policy_inputs

Number = Union[int, float]
# (log_prob, old_log_prob, advantages, mask) -> (loss_mat, branches); branches holds bool
# ``clipped_low`` / ``clipped_high``, optional ``dual_clipped``, and the detached ``log_ratio``.
TokenLoss = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    Tuple[torch.Tensor, Dict[str, torch.Tensor]],
]


class LossOptions(TypedDict, total=False):
    """The keyword arguments every policy loss takes after its own parameters, passed on to
    :func:`compute_policy_loss` (defaults there; see :func:`~megatron_cegppo.losses.cegppo_loss`)."""

    loss_agg_mode: str
    normalizer: Optional[Union[Number, torch.Tensor]]
    entropy: Optional[torch.Tensor]
    hp_threshold: Number
    check_finite: bool


def compute_policy_loss(
    token_loss: TokenLoss,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    loss_agg_mode: str = "token-mean",
    normalizer: Optional[Union[Number, torch.Tensor]] = None,
    entropy: Optional[torch.Tensor] = None,
    hp_threshold: Number = 0.5,
    check_finite: bool = True,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor], torch.Tensor]:
    """Runs ``token_loss`` on validated, sanitized inputs. Returns
    ``(loss, metrics, branches, mask)``."""
    mask = validate_policy_inputs(
        log_prob, old_log_prob, advantages, response_mask,
        loss_agg_mode=loss_agg_mode, normalizer=normalizer, entropy=entropy,
        hp_threshold=hp_threshold, check_finite=check_finite,
    )
    lp, old, adv = sanitize_inputs(mask, log_prob, old_log_prob, advantages)
    loss_mat, branches = token_loss(lp, old, adv, mask)
    loss = aggregate_loss(loss_mat, mask, loss_agg_mode, normalizer)
    dual = branches.get("dual_clipped")
    metrics = policy_metrics(
        loss=loss, log_prob=lp, log_ratio=branches["log_ratio"], advantages=adv, mask=mask,
        clipped_low=branches["clipped_low"] & mask, clipped_high=branches["clipped_high"] & mask,
        dual_clipped=None if dual is None else dual & mask,
        entropy=entropy, hp_threshold=float(hp_threshold),
    )
    return loss, metrics, branches, mask
