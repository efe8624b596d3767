"""Input checks shared by every policy loss.

All checks raise ``ValueError`` with a single message that names the offending argument
(``TypeError`` only for arguments that are not tensors at all).  The shape and
hyper-parameter checks are free (no device work).  The finiteness check looks at the
values, so it costs one device-to-host copy of three small integers; pass
``check_finite=False`` to a loss to skip it (e.g. inside a tight, already-validated loop).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Sequence, Union

import torch

from .names import LOSS_AGG_MODES

Number = Union[int, float]

__all__ = [
    "as_bool_mask",
    "check_shapes",
    "check_entropy",
    "check_finite_at_valid",
    "check_eps",
    "check_nonneg",
    "check_clip_ratio_c",
    "check_loss_agg_mode",
    "check_normalizer",
    "check_hp_threshold",
    "validate_policy_inputs",
    "sanitize_inputs",
]


def as_bool_mask(response_mask: torch.Tensor) -> torch.Tensor:
    """Return ``response_mask`` as a bool tensor (any dtype; non-zero means valid)."""
    if response_mask.dtype == torch.bool:
        return response_mask
    return response_mask != 0


def _require_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_shapes(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
) -> None:
    """All per-token inputs must be 2-D ``[batch, response_len]`` with identical shapes."""
    named = (
        ("log_prob", log_prob),
        ("old_log_prob", old_log_prob),
        ("advantages", advantages),
        ("response_mask", response_mask),
    )
    for name, t in named:
        _require_tensor(name, t)
    for name, t in named:
        if t.dim() != 2:
            raise ValueError(
                f"{name} must be 2-D [batch, response_len], got shape {tuple(t.shape)}"
            )
    ref = tuple(log_prob.shape)
    for name, t in named[1:]:
        if tuple(t.shape) != ref:
            raise ValueError(
                f"shape mismatch: {name} has shape {tuple(t.shape)} but log_prob has shape {ref}"
            )
    for name, t in named[:3]:
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_entropy(entropy: Optional[torch.Tensor], log_prob: torch.Tensor) -> None:
    """``entropy`` (optional) must have the shape of ``log_prob``."""
    if entropy is None:
        return
    _require_tensor("entropy", entropy)
    if tuple(entropy.shape) != tuple(log_prob.shape):
        raise ValueError(
            f"shape mismatch: entropy has shape {tuple(entropy.shape)} "
            f"but log_prob has shape {tuple(log_prob.shape)}"
        )


def check_finite_at_valid(mask: torch.Tensor, tensors: Sequence[tuple]) -> None:
    """Raise if any of ``tensors`` (pairs ``(name, tensor)``) is nan/inf where ``mask`` is true.

    Values at masked-out positions are ignored (padding often holds garbage such as -inf).
    One host sync for all tensors together.
    """
    if not tensors:
        return
    counts = torch.stack(
        [(~torch.isfinite(t) & mask).sum() for _, t in tensors]
    ).tolist()
    for (name, _), n in zip(tensors, counts):
        if n:
            raise ValueError(
                f"{name} has {n} non-finite (nan/inf) value(s) at valid (response_mask true) positions"
            )


def _is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _as_float(name: str, x) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(x.shape)}")
        return float(x.item())
    if not _is_real(x):
        raise ValueError(f"{name} must be a real number, got {x!r}")
    return float(x)


def check_eps(name: str, value, *, upper_one: bool, allow_none: bool = False) -> None:
    """``eps_low`` must lie in [0, 1) (``upper_one=True``); ``eps_high`` must be >= 0."""
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} must be a number, got None")
    v = _as_float(name, value)
    if upper_one:
        if not (0.0 <= v < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    elif not (0.0 <= v < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {v}")


def check_nonneg(name: str, value) -> None:
    """Coefficients such as ``beta1``/``beta2`` must be finite and >= 0."""
    v = _as_float(name, value)
    if not (0.0 <= v < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {v}")


def check_clip_ratio_c(value, *, allow_none: bool) -> None:
    """The dual-clip constant must be > 1 (``None`` disables dual clip where it is optional)."""
    if value is None:
        if allow_none:
            return
        raise ValueError("clip_ratio_c must be a number > 1, got None")
    v = _as_float("clip_ratio_c", value)
    if not (1.0 < v < math.inf):
        raise ValueError(f"clip_ratio_c must be a finite number > 1, got {v}")


def check_loss_agg_mode(mode) -> None:
    """``mode`` must be one of :data:`~megatron_cegppo.losses.names.LOSS_AGG_MODES`."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(
            f"unknown loss_agg_mode {mode!r}; valid modes: {', '.join(LOSS_AGG_MODES)}"
        )


def check_normalizer(normalizer, *, read_tensor: bool = True) -> None:
    """A caller-supplied normalizer must be a finite scalar > 0 (``None`` = compute it).

    The value of a tensor normalizer is only read (one host sync) when ``read_tensor``.
    """
    if normalizer is None:
        return
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(
                f"normalizer must be a number or a 0-dim tensor, got shape {tuple(normalizer.shape)}"
            )
        if not read_tensor:
            return
        ok = bool(((normalizer > 0) & torch.isfinite(normalizer)).reshape(()))
        if not ok:
            raise ValueError(f"normalizer must be a finite number > 0, got {normalizer.reshape(()).item()}")
        return
    if not _is_real(normalizer):
        raise ValueError(f"normalizer must be a number or a 0-dim tensor, got {normalizer!r}")
    v = float(normalizer)
    if not (0.0 < v < math.inf):
        raise ValueError(f"normalizer must be a finite number > 0, got {v}")


def check_hp_threshold(value) -> None:
    v = _as_float("hp_threshold", value)
    if not (0.0 < v <= 1.0):
        raise ValueError(f"hp_threshold must be a probability in (0, 1], got {v}")


def validate_policy_inputs(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    loss_agg_mode: str,
    normalizer=None,
    entropy: Optional[torch.Tensor] = None,
    hp_threshold: Number = 0.5,
    check_finite: bool = True,
) -> torch.Tensor:
    """Run the checks common to every policy loss and return the mask as bool.

    Loss-specific hyper-parameters (eps, beta, clip_ratio_c) are checked by each loss.
    ``check_finite=False`` skips every check that has to read device values (the
    finiteness check and the value of a tensor ``normalizer``).
    """
    check_shapes(log_prob, old_log_prob, advantages, response_mask)
    check_entropy(entropy, log_prob)
    check_loss_agg_mode(loss_agg_mode)
    check_normalizer(normalizer, read_tensor=check_finite)
    check_hp_threshold(hp_threshold)
    mask = as_bool_mask(response_mask)
    if check_finite:
        check_finite_at_valid(
            mask,
            (("log_prob", log_prob.detach()), ("old_log_prob", old_log_prob), ("advantages", advantages)),
        )
    return mask


def sanitize_inputs(
    mask: torch.Tensor,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
):
    """Cast to the working dtype and zero the masked-out positions.

    The working dtype is ``promote(inputs..., float32)``: bf16/fp16 are computed in fp32,
    fp64 stays fp64.  Masked-out positions are replaced with ``torch.where`` (never by
    multiplying with the mask), so nan/-inf there cannot reach the loss, and the gradient
    flowing back to ``log_prob`` at those positions is exactly zero.

    Returns ``(log_prob, old_log_prob, advantages)``; only ``log_prob`` keeps its graph.
    """
    dtype = torch.float32
    for t in (log_prob, old_log_prob, advantages):
        dtype = torch.promote_types(dtype, t.dtype)
    zero = torch.zeros((), dtype=dtype, device=log_prob.device)
    lp = torch.where(mask, log_prob.to(dtype), zero)
    old = torch.where(mask, old_log_prob.detach().to(dtype), zero)
    adv = torch.where(mask, advantages.detach().to(dtype), zero)
    return lp, old, adv
