"""Checkpoints: atomic, verified directories (store) and the per-rank random state (rng)."""

from megatron_cegppo.checkpoint.store import (
    CheckpointError,
    CheckpointStore,
    digest_file,
    digest_files,
    split_files,
)

__all__ = ["CheckpointError", "CheckpointStore", "digest_file", "digest_files", "split_files"]
