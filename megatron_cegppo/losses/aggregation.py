"""Reduction of a per-token loss matrix ``[batch, response_len]`` to a scalar.

Every mode is written as ``numerator / denominator``.  The numerator is a plain sum over
the tensor that is passed in; the denominator comes from :func:`loss_normalizer` and
depends only on the mask.  Splitting a mini-batch into micro-batches (or across
data-parallel ranks) and passing the *mini-batch* denominator as ``normalizer`` to each
micro-batch therefore makes the micro-batch losses (and their gradients) add up exactly to
the mini-batch loss:

    norm = loss_normalizer(full_mask, mode)            # or all-reduce clamp=False counts
    total = sum(aggregate_loss(l_k, m_k, mode, normalizer=norm) for l_k, m_k in chunks)

A sequence is *valid* when it has at least one valid (mask true) token.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .validation import as_bool_mask, check_loss_agg_mode, check_normalizer

__all__ = ["loss_normalizer", "aggregate_loss", "masked_loss_sum"]


def loss_normalizer(
    mask: torch.Tensor, mode: str, *, clamp: bool = True, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Denominator used by :func:`aggregate_loss` for ``mode`` (0-dim float tensor).

    * ``token-mean``: number of valid tokens.
    * ``seq-mean-token-sum`` / ``seq-mean-token-mean``: number of valid sequences.
    * ``seq-mean-token-sum-norm``: ``batch_size * response_len`` (a constant).

    With ``clamp=True`` (default) the value is clamped to ``>= 1`` so an all-masked batch
    yields a loss of 0 rather than nan.  Use ``clamp=False`` to get raw counts that can be
    summed across micro-batches or all-reduced across ranks (clamp after reducing).
    """
    check_loss_agg_mode(mode)
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [batch, response_len], got shape {tuple(mask.shape)}")
    m = as_bool_mask(mask)
    if mode == "token-mean":
        n = m.sum().to(dtype)
    elif mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        n = m.any(dim=-1).sum().to(dtype)
    else:  # seq-mean-token-sum-norm
        n = torch.tensor(float(m.shape[0] * m.shape[1]), dtype=dtype, device=m.device)
    if clamp:
        n = n.clamp(min=1.0)
    return n


def masked_loss_sum(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Numerator of ``mode`` (0-dim): the quantity that is divided by the normalizer.

    * ``token-mean``, ``seq-mean-token-sum``, ``seq-mean-token-sum-norm``: sum of the loss
      over valid tokens.
    * ``seq-mean-token-mean``: sum over valid sequences of (token sum / token count).

    Masked-out entries are replaced with ``torch.where`` (not multiplied by 0), so nan/inf
    there never reaches the result or the gradient.
    """
    check_loss_agg_mode(mode)
    m = as_bool_mask(mask)
    masked = torch.where(m, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device))
    if mode == "seq-mean-token-mean":
        seq_len = m.sum(dim=-1).clamp(min=1).to(loss_mat.dtype)
        return (masked.sum(dim=-1) / seq_len).sum()
    return masked.sum()


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    normalizer: Optional[Union[float, int, torch.Tensor]] = None,
) -> torch.Tensor:
    """Reduce ``loss_mat`` ``[batch, response_len]`` to a 0-dim tensor.

    Modes (``mask`` as bool; ``L = mask.shape[-1]``):

    * ``token-mean``: ``sum(loss over valid tokens) / #valid tokens``.  Each token weighs
      the same across the batch (DAPO's token-level loss; CE-GPPO's setting).
    * ``seq-mean-token-sum``: ``sum_i (token sum of sequence i) / #valid sequences``.
    * ``seq-mean-token-mean``: ``sum_i (token sum_i / token count_i) / #valid sequences``
      (the original GRPO sample-level average; GSPO's setting).
    * ``seq-mean-token-sum-norm``: ``sum(loss over valid tokens) / (batch * L)`` (Dr. GRPO:
      a constant denominator, so no length bias).

    Beside verl's ``agg_loss`` (which aggregates each micro-batch alone and averages the
    micro-batches): token-mean is equal only when every micro-batch holds as many tokens;
    seq-mean-token-sum is verl's x (non-empty / all sequences); seq-mean-token-mean is equal
    without empty responses (verl: nan); seq-mean-token-sum-norm is verl's / micro-batch size
    (verl divides each micro-batch by ``L``, not by ``batch * L``). Here none depends on the
    micro-batch size; ``tests/unit/losses/test_verl_factors.py`` checks each factor.

    ``normalizer`` (number or 0-dim tensor > 0) replaces the computed denominator; use the
    mini-batch-wide :func:`loss_normalizer` so that micro-batch losses sum to the
    mini-batch loss.  A numeric ``normalizer`` is range-checked here; the value of a tensor
    one is not read (no host sync; the policy losses check it).  A computed denominator is clamped to ``>= 1`` (all-masked input gives
    a loss of exactly 0 with a valid graph).  The result has dtype
    ``promote(loss_mat.dtype, float32)``.
    """
    check_loss_agg_mode(mode)
    check_normalizer(normalizer, read_tensor=False)
    if loss_mat.shape != mask.shape:
        raise ValueError(
            f"shape mismatch: loss_mat has shape {tuple(loss_mat.shape)} "
            f"but mask has shape {tuple(mask.shape)}"
        )
    dtype = torch.promote_types(loss_mat.dtype, torch.float32)
    loss_mat = loss_mat.to(dtype)
    num = masked_loss_sum(loss_mat, mask, mode)
    if normalizer is None:
        den = loss_normalizer(mask, mode, clamp=True, dtype=dtype)
    else:
        den = torch.as_tensor(
            normalizer.detach() if isinstance(normalizer, torch.Tensor) else normalizer,
            dtype=dtype,
            device=loss_mat.device,
        ).reshape(())
    return num / den
