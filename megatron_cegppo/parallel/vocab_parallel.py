"""Per-token log-probabilities and entropy over a vocabulary sharded across tensor parallelism.

Each tensor-parallel rank holds the logits (or the output-layer weight) of one contiguous
vocabulary shard, as megatron's ``ColumnParallelLinear`` output layer produces them: rank ``r``
of ``TP`` owns ids ``[r * V/TP, (r + 1) * V/TP)`` (``VocabUtility``). The full vocabulary is
never gathered: each rank reduces its shard to three numbers per token (a local max, the
sum of exponentials and the sum of exponential-weighted logits), and two all-reduces over
``[tokens]``-sized vectors give the global log-sum-exp and entropy.

Memory: the forward and backward passes work on chunks of tokens, so the only
``[tokens, V/TP]`` tensor ever held whole is the gradient of the logits (which autograd needs
anyway). What is saved for backward is the input itself plus ``[tokens]`` statistics; the
softmax is recomputed chunk by chunk in backward. The fused variant starts from the hidden
states and the output weight, and then not even the logits exist whole.

Padding: megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by * TP``;
with the true ``vocab_size`` given, the padded columns are left out of the softmax, the
log-probs and the entropy, and get zero gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_cegppo.parallel.chunking import LOGITS_CHUNK_ELEMENTS as _CHUNK_ELEMENTS


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the (padded) vocabulary."""

    start: int  # global id of the shard's first column
    width: int  # columns in the shard (V_padded / TP)
    valid: int  # leading columns that are real tokens (< width only in the padded tail)
    vocab_size: int  # true vocabulary size (padded size when not given)

    @classmethod
    def of(cls, width: int, tp_group, vocab_size: Optional[int]) -> "VocabShard":
        rank, world = _rank_and_world(tp_group)
        padded = width * world
        if vocab_size is None:
            vocab_size = padded
        if not 0 < vocab_size <= padded:
            raise ValueError(
                f"vocab_size={vocab_size} must be in [1, {padded}] (the padded vocabulary: "
                f"{width} columns per shard x tensor-parallel size {world})"
            )
        start = rank * width
        valid = max(0, min(width, vocab_size - start))
        return cls(start=start, width=width, valid=valid, vocab_size=vocab_size)


def _rank_and_world(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _check_inputs(scores_shape, labels: torch.Tensor, temperature: float, what: str) -> None:
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(scores_shape):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the {what} shape without its last "
            f"dimension, {tuple(scores_shape)}"
        )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_label_range(labels: torch.Tensor, vocab_size: int) -> None:
    bad = (labels < 0) | (labels >= vocab_size)
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"{int(bad.sum())} label(s) outside the vocabulary [0, {vocab_size}), e.g. {first}"
        )


def _chunk_rows(width: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    return max(1, _CHUNK_ELEMENTS // max(1, width))


def _shard_statistics(z: torch.Tensor, labels: torch.Tensor, shard: VocabShard):
    """Local statistics of one chunk of tempered logits ``z`` [c, valid] (fp32, owned by the
    caller: it is overwritten). Returns (max, sum exp(z - max), sum exp(z - max)(z - max),
    label logit or 0 where another shard owns the label)."""
    rows = z.shape[0]
    local = labels - shard.start
    owned = (local >= 0) & (local < shard.valid)
    if shard.valid == 0:
        zeros = z.new_zeros(rows)
        return z.new_full((rows,), -math.inf), zeros, zeros, zeros
    label_logit = z.gather(1, local.clamp(0, shard.valid - 1).unsqueeze(1)).squeeze(1)
    label_logit = torch.where(owned, label_logit, 0.0)
    row_max = z.amax(dim=1)
    z.sub_(row_max.unsqueeze(1))
    e = torch.exp(z)
    sum_exp = e.sum(dim=1)
    weighted = e.mul_(z).sum(dim=1)
    return row_max, sum_exp, weighted, label_logit


def _combine(row_max, sum_exp, weighted, label_logit, group, world):
    """Combines the shards' statistics: returns (log-sum-exp, entropy, label logit)."""
    global_max = row_max.clone()
    if world > 1:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    shift = row_max - global_max  # <= 0, -inf for a shard without valid columns
    has_mass = sum_exp > 0
    scale = torch.where(has_mass, torch.exp(shift), 0.0)
    # Re-express each shard's sums relative to the global max:
    #   sum e^(z - M) = scale * S,  sum e^(z - M)(z - M) = scale * (Q + shift * S)
    stacked = torch.stack(
        [
            scale * sum_exp,
            torch.where(has_mass, scale * (weighted + shift * sum_exp), 0.0),
            label_logit,
        ]
    )
    if world > 1:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    total_exp, total_weighted, label_logit = stacked.unbind(0)
    log_total = torch.log(total_exp)
    lse = global_max + log_total
    entropy = log_total - total_weighted / total_exp
    return lse, entropy, label_logit


def _grad_tempered_logits(z, labels, lse, entropy, g_lp, g_ent, shard: VocabShard):
    """d(loss)/dz for one chunk of tempered logits ``z`` [c, valid] (overwritten)::

        d logp_label / dz_j = 1[j = label] - p_j
        d H / dz_j          = -p_j (log p_j + H)
    """
    logp = z.sub_(lse.unsqueeze(1))
    p = torch.exp(logp)
    coeff = logp.add_(entropy.unsqueeze(1)).mul_(g_ent.unsqueeze(1)).add_(g_lp.unsqueeze(1))
    grad = p.mul_(coeff).neg_()
    local = labels - shard.start
    owned = (local >= 0) & (local < shard.valid)
    rows = torch.nonzero(owned).squeeze(1)
    grad.index_put_((rows, local[rows]), g_lp[rows], accumulate=True)
    return grad


def _log_softmax_statistics(tempered_chunk, labels, shard: VocabShard, group, chunk_rows: int):
    """(log-sum-exp, entropy, label logit) per token over the whole vocabulary.
    ``tempered_chunk(begin, end)`` gives a fresh float32 ``[end - begin, valid]`` chunk."""
    n = labels.shape[0]
    stats = [torch.empty(n, dtype=torch.float32, device=labels.device) for _ in range(4)]
    for begin in range(0, n, chunk_rows):
        end = min(n, begin + chunk_rows)
        for out, value in zip(stats, _shard_statistics(tempered_chunk(begin, end), labels[begin:end], shard)):
            out[begin:end] = value
    return _combine(*stats, group, _rank_and_world(group)[1])


def _grad_logits(z, temperature, begin, end, labels, lse, entropy, g_lp, g_ent, shard):
    """Gradient with respect to the (untempered) logits of rows ``begin:end``."""
    rows = slice(begin, end)
    grad = _grad_tempered_logits(z, labels[rows], lse[rows], entropy[rows], g_lp[rows], g_ent[rows], shard)
    return grad.div_(temperature) if temperature != 1.0 else grad


def _zeros_if_none(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad.reshape(-1).float()


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, temperature, shard: VocabShard, chunk_rows):
        flat = logits.reshape(-1, shard.width)
        lse, entropy, label_logit = _log_softmax_statistics(
            lambda b, e: _tempered(flat[b:e, : shard.valid], temperature),
            labels.reshape(-1), shard, group, chunk_rows,
        )
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.temperature, ctx.shard, ctx.chunk_rows = temperature, shard, chunk_rows
        log_probs = label_logit - lse
        return log_probs.view(labels.shape), entropy.view(labels.shape)

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        logits, labels, lse, entropy = ctx.saved_tensors
        shard, temperature = ctx.shard, ctx.temperature
        flat = logits.reshape(-1, shard.width)
        flat_labels = labels.reshape(-1)
        g_lp, g_ent = _zeros_if_none(g_lp, lse), _zeros_if_none(g_ent, lse)
        grad = torch.empty_like(flat)
        if shard.valid < shard.width:
            grad[:, shard.valid :] = 0
        for begin in range(0, flat.shape[0], ctx.chunk_rows):
            end = min(flat.shape[0], begin + ctx.chunk_rows)
            z = _tempered(flat[begin:end, : shard.valid], temperature)
            grad[begin:end, : shard.valid] = _grad_logits(
                z, temperature, begin, end, flat_labels, lse, entropy, g_lp, g_ent, shard
            )
        return grad.view(logits.shape), None, None, None, None, None


def _tempered(chunk: torch.Tensor, temperature: float, owned: bool = False) -> torch.Tensor:
    """``chunk`` in float32 divided by the temperature, in a buffer the caller may overwrite:
    a copy unless ``owned`` (a fresh float32 matmul output is reused as it is)."""
    z = chunk.to(torch.float32, copy=not owned)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def vocab_parallel_logprobs_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group=None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``labels`` and entropy of ``softmax(logits / temperature)`` over a
    tensor-parallel vocabulary.

    Args:
        logits: this rank's vocabulary shard, ``[..., V_padded / TP]``, any float dtype.
            Not modified (megatron's ``vocab_parallel_cross_entropy`` subtracts the max in
            place; this function works on chunked float32 copies).
        labels: global token ids, ``logits.shape[:-1]``.
        tp_group: the tensor-parallel process group (``None``: a single shard).
        temperature: the logits are divided by it (vLLM's sampling temperature).
        vocab_size: the true vocabulary size; columns at or past it are padding and are
            excluded. ``None``: every column is a token.
        chunk_size: tokens per chunk of scratch work (default: ~16 MiB of fp32 per buffer).

    Returns:
        ``(log_probs, entropy)``, float32, shaped like ``labels``; both differentiable.
    """
    _check_inputs(logits.shape[:-1], labels, temperature, "logits")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float tensor, got dtype {logits.dtype}")
    shard = VocabShard.of(logits.shape[-1], tp_group, vocab_size)
    _check_label_range(labels, shard.vocab_size)
    chunk_rows = _chunk_rows(shard.width, chunk_size)
    return _VocabParallelLogprobsEntropy.apply(
        logits, labels, tp_group, float(temperature), shard, chunk_rows
    )


class _FusedVocabParallelLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, group, temperature, shard: VocabShard, chunk_rows):
        world = _rank_and_world(group)[1]
        flat = hidden.reshape(-1, hidden.shape[-1])
        w = weight[: shard.valid]
        lse, entropy, label_logit = _log_softmax_statistics(
            lambda b, e: _tempered(flat[b:e] @ w.t(), temperature, owned=True),
            labels.reshape(-1), shard, group, chunk_rows,
        )
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.group, ctx.world = group, world
        ctx.temperature, ctx.shard, ctx.chunk_rows = temperature, shard, chunk_rows
        log_probs = label_logit - lse
        return log_probs.view(labels.shape), entropy.view(labels.shape)

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        shard, temperature = ctx.shard, ctx.temperature
        flat = hidden.reshape(-1, hidden.shape[-1])
        flat_labels = labels.reshape(-1)
        g_lp, g_ent = _zeros_if_none(g_lp, lse), _zeros_if_none(g_ent, lse)
        w = weight[: shard.valid]
        grad_hidden = torch.empty_like(flat)
        # Accumulated over chunks in float32 whatever the weight's dtype.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for begin in range(0, flat.shape[0], ctx.chunk_rows):
            end = min(flat.shape[0], begin + ctx.chunk_rows)
            h = flat[begin:end]
            z = _tempered(h @ w.t(), temperature, owned=True)
            gz = _grad_logits(
                z, temperature, begin, end, flat_labels, lse, entropy, g_lp, g_ent, shard
            ).to(hidden.dtype)
            torch.mm(gz, w, out=grad_hidden[begin:end])
            if gz.dtype == torch.float32:
                grad_weight[: shard.valid].addmm_(gz.t(), h)  # no [V/TP, H] temporary
            else:
                grad_weight[: shard.valid] += gz.t() @ h
        if ctx.world > 1:
            # hidden is replicated over the tensor-parallel group and every shard's logits
            # depend on it: its gradient is the sum over shards (the backward of megatron's
            # copy_to_tensor_model_parallel_region).
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
        return (
            grad_hidden.view(hidden.shape),
            grad_weight.to(weight.dtype),
            None, None, None, None, None,
        )


def fused_vocab_parallel_logprobs_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group=None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The result of :func:`vocab_parallel_logprobs_entropy` on ``hidden @ weight.T``, computed
    chunk by chunk of tokens so that no ``[tokens, V/TP]`` tensor exists whole, in forward or
    backward (the logits of a chunk are recomputed in backward).

    Args:
        hidden: last hidden states ``[..., H]``, the same on every rank of ``tp_group``
            (with sequence parallel, gather them first with
            ``gather_from_sequence_parallel_region(..., tensor_parallel_output_grad=False)``:
            the gradient returned here is already summed over the group).
        weight: this rank's shard of the output-layer weight, ``[V_padded / TP, H]``.
        labels: global token ids, ``hidden.shape[:-1]``.
        tp_group, temperature, vocab_size: as in :func:`vocab_parallel_logprobs_entropy`.
        chunk_size: tokens per chunk (default: ~16 MiB of fp32 logits per chunk).

    Gradients flow to ``hidden`` (summed over the tensor-parallel group) and ``weight``.
    """
    _check_inputs(hidden.shape[:-1], labels, temperature, "hidden")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V/TP, {hidden.shape[-1]}] to match hidden's last dimension, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ")
    shard = VocabShard.of(weight.shape[0], tp_group, vocab_size)
    _check_label_range(labels, shard.vocab_size)
    chunk_rows = _chunk_rows(shard.width, chunk_size)
    return _FusedVocabParallelLogprobsEntropy.apply(
        hidden, weight, labels, tp_group, float(temperature), shard, chunk_rows
    )
