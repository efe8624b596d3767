"""Checkpoints: atomic, verified directories (store) and the per-rank random state (rng)."""

from megatron_cegppo.checkpoint.store import CheckpointError, CheckpointStore

__all__ = ["CheckpointError", "CheckpointStore"]
