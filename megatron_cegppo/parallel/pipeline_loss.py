"""The policy loss wired into megatron-core's pipeline schedules.

``get_forward_backward_func()`` calls ``forward_step(data_iterator, model)`` once per
micro-batch on every pipeline stage. Earlier stages only run their layers (the schedule
sends the activations on); on the last stage the returned ``loss_func`` turns the
vocab-sharded output into per-token log-probs and entropy across the tensor-parallel ranks
and applies the chosen policy loss.

Exact mini-batch losses: a mini-batch is split into ``num_microbatches`` micro-batches on each
of ``dp_world_size`` data-parallel ranks. Each micro-batch is aggregated with the
*mini-batch-wide* normalizer (``batch["loss_normalizer"]``, from
:func:`minibatch_loss_normalizer`), so the micro-batch losses add up to the mini-batch loss for
every aggregation mode. The schedule divides each returned loss by ``num_microbatches`` and
megatron's DDP averages gradients over data-parallel ranks, so the returned loss is multiplied
by ``num_microbatches * dp_world_size`` to undo both.

Micro-batches are :class:`~megatron_cegppo.parallel.microbatch.MicroBatch` objects (or
mappings of its field names), unpacked or packed: the per-token log-probs and entropy are
computed in the model's layout and mapped into the loss's one-row-per-sequence layout before
any loss, so packing never changes what a loss or an aggregation mode sees.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.distributed as dist

from megatron_cegppo.losses import POLICY_LOSSES, aggregate_loss, loss_normalizer
from megatron_cegppo.losses.names import LOGPROB_IMPLS, LOSS_AGG_MODES, LOSS_NAMES, check_choice
from megatron_cegppo.losses.statistics import masked_mean
from megatron_cegppo.models.gpt import unwrap_model
from megatron_cegppo.parallel.microbatch import MicroBatch, as_microbatch
from megatron_cegppo.parallel.vocab_parallel import (
    fused_vocab_parallel_logprobs_entropy,
    vocab_parallel_logprobs_entropy,
)


@dataclass(frozen=True)
class PolicyLossSpec:
    """What the last pipeline stage computes."""

    loss: str = "cegppo"  # one of losses.names.LOSS_NAMES
    loss_kwargs: Mapping[str, Any] = field(default_factory=dict)  # eps_low, beta1, ...
    loss_agg_mode: str = "token-mean"  # one of losses.names.LOSS_AGG_MODES
    temperature: float = 1.0
    vocab_size: Optional[int] = None  # true vocabulary size; padded columns excluded
    logprob_impl: str = "logits"  # one of losses.names.LOGPROB_IMPLS (what each does: there)
    chunk_size: Optional[int] = None
    entropy_coeff: float = 0.0  # > 0 adds an entropy bonus (off in the paper)
    # > 0 adds kl_coeff * KL(policy || reference) from batch["ref_log_prob"] (off in the paper)
    kl_coeff: float = 0.0
    kl_kind: str = "k3"  # k1 | k2 | k3, see losses.kl.kl_penalty
    # > 0 adds positive_loss_coeff * the NLL of the tokens of correct responses
    # (batch["positive"]), aggregated in loss_agg_mode over those responses
    # (batch["positive_normalizer"]): the CE-GPPO authors' recipe uses 0.1
    positive_loss_coeff: float = 0.0

    def __post_init__(self) -> None:
        check_choice("policy loss", self.loss, sorted(LOSS_NAMES))
        check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        check_choice("logprob_impl", self.logprob_impl, LOGPROB_IMPLS)


def minibatch_loss_normalizer(
    loss_masks: Iterable[torch.Tensor], loss_agg_mode: str, dp_group=None
) -> torch.Tensor:
    """The aggregation denominator of a whole mini-batch: summed over its micro-batches and
    (with ``dp_group``) over data-parallel ranks. Every mode's denominator is additive (a
    token count, a sequence count, or batch x length)."""
    masks = list(loss_masks)
    if not masks:
        raise ValueError("a mini-batch needs at least one micro-batch")
    return _summed_over_ranks([loss_normalizer(m.bool(), loss_agg_mode, clamp=False) for m in masks], dp_group)


def positive_loss_normalizer(micro: Iterable[MicroBatch], loss_agg_mode: str, dp_group=None) -> torch.Tensor:
    """The denominator of the positive-sample NLL term over a whole mini-batch: the loss's
    own mode over the correct responses only (their tokens, their number, or their number x
    length), as if they were a batch of their own. Counted with masks, not by selecting the
    rows: no device-to-host sync."""
    micro = [as_microbatch(m) for m in micro]
    if not micro or any(m.positive is None for m in micro):
        raise ValueError("the positive-sample NLL term needs every micro-batch's 'positive' flags")
    counts = []
    for m in micro:
        rows = m.positive.bool()
        if loss_agg_mode == "seq-mean-token-sum-norm":  # a constant per row: their number x length
            counts.append(rows.sum().to(torch.float32) * m.loss_mask.shape[-1])
        else:  # tokens or non-empty sequences: the rows left out count nothing
            counts.append(loss_normalizer(m.loss_mask.bool() & rows.unsqueeze(-1), loss_agg_mode, clamp=False))
    return _summed_over_ranks(counts, dp_group)


def _summed_over_ranks(counts: list, dp_group) -> torch.Tensor:
    # on the counts' device: NCCL groups refuse CPU tensors (also in a world of one)
    total = torch.zeros((), dtype=torch.float32, device=counts[0].device)
    for c in counts:
        total = total + c
    if dp_group is not None:
        dist.all_reduce(total, group=dp_group)
    return total.clamp(min=1.0)


def _tp_group(core: torch.nn.Module):
    pg = getattr(core, "pg_collection", None)
    if pg is not None and getattr(pg, "tp", None) is not None:
        return pg.tp
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _output_weight(core: torch.nn.Module) -> torch.Tensor:
    if core.share_embeddings_and_output_weights:
        return core.shared_embedding_or_output_weight()
    return core.output_layer.weight


def _output_layer_forward(self, input_, weight=None, runtime_gather_output=None):
    """Stands in for ``ColumnParallelLinear.forward`` of the output layer. While
    ``self.return_hidden_states`` is set (log-probs computed by the fused function), it
    returns the (sequence-gathered) hidden states instead of logits; otherwise it is the
    upstream forward. The fused function sums the hidden-state gradient over the
    tensor-parallel group itself, so the sequence-parallel gather's backward only splits."""
    if not self.return_hidden_states:
        return type(self).forward(self, input_, weight=weight, runtime_gather_output=runtime_gather_output)
    if self.sequence_parallel:
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        input_ = gather_from_sequence_parallel_region(
            input_, tensor_parallel_output_grad=False, group=self.tp_group
        )
    return input_, None


def set_output_hidden_states(model: torch.nn.Module, enabled: bool) -> None:
    """Makes the last stage's GPTModel return hidden states ``[b, s, h]`` instead of logits
    (or back), without touching its parameters or state dict."""
    core = unwrap_model(model)
    if not core.post_process:
        return
    layer = core.output_layer
    if not hasattr(layer, "return_hidden_states"):
        layer.forward = types.MethodType(_output_layer_forward, layer)
    layer.return_hidden_states = enabled


def _token_logprobs_entropy(spec: PolicyLossSpec, core, output, labels):
    kw = dict(
        tp_group=_tp_group(core), temperature=spec.temperature,
        vocab_size=spec.vocab_size, chunk_size=spec.chunk_size,
    )
    if spec.logprob_impl == "fused":
        return fused_vocab_parallel_logprobs_entropy(output, _output_weight(core), labels, **kw)
    return vocab_parallel_logprobs_entropy(output, labels, **kw)


def _run_model(model, batch: MicroBatch, spec: PolicyLossSpec):
    core = unwrap_model(model)
    set_output_hidden_states(core, spec.logprob_impl == "fused")
    extra = {"packed_seq_params": batch.packed_seq_params} if batch.packed_seq_params is not None else {}
    output = model(batch.input_ids, batch.position_ids, batch.attention_mask, **extra)
    return core, output


def _sequence_logprobs_entropy(spec: PolicyLossSpec, core, output, batch: MicroBatch):
    """Per-token log-probs and entropy in the loss's ``[sequences, seq_len]`` layout."""
    log_prob, entropy = _token_logprobs_entropy(spec, core, output, batch.labels)
    return batch.to_sequences(log_prob), batch.to_sequences(entropy)


def _policy_loss_func(spec: PolicyLossSpec, batch: MicroBatch, core, scale: float, output):
    mask = batch.loss_mask.bool()
    log_prob, entropy = _sequence_logprobs_entropy(spec, core, output, batch)
    loss, metrics = POLICY_LOSSES[spec.loss](
        log_prob, batch.old_log_prob, batch.advantages, mask,
        loss_agg_mode=spec.loss_agg_mode, normalizer=batch.loss_normalizer,
        entropy=entropy.detach(), **dict(spec.loss_kwargs),
    )
    if spec.entropy_coeff:
        bonus = aggregate_loss(entropy, mask, spec.loss_agg_mode, normalizer=batch.loss_normalizer)
        loss = loss - spec.entropy_coeff * bonus
    metrics = dict(metrics)
    if spec.kl_coeff:
        from megatron_cegppo.losses.kl import kl_penalty

        kl = kl_penalty(log_prob, batch.ref_log_prob, kind=spec.kl_kind)
        loss = loss + spec.kl_coeff * aggregate_loss(kl, mask, spec.loss_agg_mode, normalizer=batch.loss_normalizer)
        metrics["kl_ref"] = masked_mean(kl.detach(), mask)
    if spec.positive_loss_coeff:
        if batch.positive is None or batch.positive_normalizer is None:
            raise ValueError("positive_loss_coeff > 0 needs the micro-batch's 'positive' flags and "
                             "'positive_normalizer' (positive_loss_normalizer)")
        positive = mask & batch.positive.bool().unsqueeze(-1)
        nll = aggregate_loss(-log_prob, positive, spec.loss_agg_mode, normalizer=batch.positive_normalizer)
        loss = loss + spec.positive_loss_coeff * nll
        metrics["positive_nll"] = nll.detach()  # this micro-batch's share, like "loss"
    metrics["loss"] = loss.detach()
    metrics["entropy"] = masked_mean(entropy.detach(), mask)
    return loss * scale, metrics


def make_policy_forward_step(
    spec: PolicyLossSpec, *, num_microbatches: int, dp_world_size: int = 1
) -> Callable:
    """A ``forward_step_func`` for ``get_forward_backward_func()`` that trains on ``spec``.

    The per-micro-batch metrics (the policy loss's, plus ``loss`` — this micro-batch's share
    of the mini-batch loss — and ``entropy``) come back from the schedule on the last stage.
    """
    if num_microbatches < 1 or dp_world_size < 1:
        raise ValueError("num_microbatches and dp_world_size must be >= 1")
    scale = float(num_microbatches * dp_world_size)

    def forward_step(data_iterator, model):
        batch = as_microbatch(next(data_iterator))
        core, output = _run_model(model, batch, spec)
        return output, partial(_policy_loss_func, spec, batch, core, scale)

    return forward_step


def _logprob_loss_func(spec: PolicyLossSpec, batch: MicroBatch, core, output):
    log_prob, entropy = _sequence_logprobs_entropy(spec, core, output, batch)
    zero = log_prob.new_zeros(())
    return zero, {"log_prob": log_prob.detach(), "entropy": entropy.detach()}


def make_logprob_forward_step(spec: PolicyLossSpec) -> Callable:
    """A ``forward_step_func`` for ``forward_only=True`` runs: the last stage returns each
    micro-batch's per-token ``log_prob`` and ``entropy`` in the loss's layout (e.g. the old
    policy's log-probs before an update). The loss fields are not read."""

    def forward_step(data_iterator, model):
        batch = as_microbatch(next(data_iterator))
        core, output = _run_model(model, batch, spec)
        return output, partial(_logprob_loss_func, spec, batch, core)

    return forward_step


# shares of a mini-batch total, or counts: summed over micro-batches and ranks
SUMMED_METRICS = ("loss", "num_tokens", "positive_nll")


def reduce_microbatch_metrics(stores: list[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Combines the per-micro-batch metric dicts the schedule returns: ``loss`` and
    ``positive_nll`` are summed (each is a share of a mini-batch total), ``*_clipped`` counts
    and ``num_tokens`` are summed, ``*_max`` maximised, every other metric is averaged weighted by its micro-batch's
    ``num_tokens``. The same rules combine data-parallel ranks' reduced metrics."""
    if not stores:
        return {}
    weights = [float(s.get("num_tokens", 1.0)) for s in stores]
    total = sum(weights) or 1.0
    out: dict[str, float] = {}
    for key in stores[0]:
        values = [float(s[key]) for s in stores]
        if key in SUMMED_METRICS or key.endswith("_clipped"):
            out[key] = sum(values)
        elif key.endswith("_max"):
            out[key] = max(values)
        else:
            out[key] = sum(v * w for v, w in zip(values, weights)) / total
    return out
