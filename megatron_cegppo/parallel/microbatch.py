"""One micro-batch as the pipeline forward step reads it.

Two layouts of the same sequences:

- the model's: ``input_ids``, ``position_ids``, ``labels`` of ``[rows, tokens]``. Unpacked, a
  row is one sequence, right-padded; packed, the micro-batch is one row holding several
  sequences back to back (each with its own label-aligned tokens), padded at the end to a
  fixed length, with either a block-diagonal causal ``attention_mask`` (megatron's local
  attention: no token attends across a sequence boundary; RoPE scores depend only on relative
  positions, which are unchanged inside a block) or megatron's THD ``packed_seq_params``
  (transformer-engine attention, RoPE restarting at each ``cu_seqlens`` boundary);
- the loss's: ``loss_mask``, ``advantages``, ``rollout_log_prob``, ``old_log_prob``,
  ``ref_log_prob`` of ``[sequences, seq_len]`` (and ``positive`` of ``[sequences]``), one row
  per sequence, as the losses and their aggregation modes define them. ``unpack_index`` maps
  the model's per-token outputs into it.

Position ``t`` of a loss row scores ``labels`` at the model position ``unpack_index[row, t]``
(-1: none). Unpacked micro-batches have ``unpack_index = None``: the layouts coincide.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

import torch


@dataclass
class MicroBatch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    advantages: Optional[torch.Tensor] = None
    rollout_log_prob: Optional[torch.Tensor] = None
    old_log_prob: Optional[torch.Tensor] = None
    ref_log_prob: Optional[torch.Tensor] = None
    loss_normalizer: Optional[torch.Tensor] = None  # 0-dim, the whole mini-batch's denominator
    # [sequences] bool: the responses judged correct (the positive-sample NLL term), and that
    # term's mini-batch-wide denominator (over the positive sequences only)
    positive: Optional[torch.Tensor] = None
    positive_normalizer: Optional[torch.Tensor] = None
    sequence_index: Optional[torch.Tensor] = None  # [sequences] long: each one's place in the step
    attention_mask: Optional[torch.Tensor] = None  # [1, 1, T, T] bool, True = masked out
    packed_seq_params: Any = None  # megatron.core.packed_seq_params.PackedSeqParams
    unpack_index: Optional[torch.Tensor] = None  # [sequences, seq_len] long, -1 where no token

    @property
    def packed(self) -> bool:
        return self.unpack_index is not None

    @property
    def real_tokens(self) -> int:
        """Tokens of the sequences themselves (prompt and response, label-aligned): what the
        model would compute without padding."""
        if self.unpack_index is not None:
            return int((self.unpack_index >= 0).sum())
        # unpacked rows end at their last response token (right padding after it)
        mask = self.loss_mask.bool()
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        return int((torch.where(mask, positions, -1).max(dim=1).values + 1).sum())

    @property
    def computed_tokens(self) -> int:
        """Tokens the model computes for this micro-batch, padding included."""
        return int(self.input_ids.numel())

    def to_sequences(self, per_token: torch.Tensor) -> torch.Tensor:
        """The model's ``[rows, tokens]`` per-token values in the loss's ``[sequences, seq_len]``
        layout (0 where no token); differentiable."""
        if self.unpack_index is None:
            return per_token
        flat = per_token.reshape(-1)
        index = self.unpack_index
        gathered = flat[index.clamp(min=0)]
        return torch.where(index >= 0, gathered, torch.zeros((), dtype=gathered.dtype, device=gathered.device))


_FIELDS = None


def as_microbatch(batch: Any) -> MicroBatch:
    """A :class:`MicroBatch` from itself or from a mapping of its field names."""
    global _FIELDS
    if isinstance(batch, MicroBatch):
        return batch
    if isinstance(batch, Mapping):
        if _FIELDS is None:
            _FIELDS = {f.name for f in fields(MicroBatch)}
        unknown = set(batch) - _FIELDS
        if unknown:
            raise KeyError(f"unknown micro-batch field(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
        return MicroBatch(**batch)
    raise TypeError(f"a micro-batch must be a MicroBatch or a mapping, got {type(batch).__name__}")
