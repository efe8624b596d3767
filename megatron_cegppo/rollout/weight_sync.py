"""Megatron -> vLLM weights after every optimizer step."""

from __future__ import annotations

from megatron_cegppo.models.hf_config import HFArchitecture
from megatron_cegppo.models.hf_io import BUCKET_BYTES, export_hf_weights
from megatron_cegppo.rollout.engine import RolloutEngine


def push_megatron_weights(engine: RolloutEngine, chunks, arch: HFArchitecture, *,
                          bucket_bytes: int = BUCKET_BYTES) -> None:
    """Streams this rank's model (gathered over TP, broadcast over PP, one bucket at a time)
    into its engine. Every rank of the model-parallel groups must call it together."""
    engine.push_weights(export_hf_weights(chunks, arch, bucket_bytes=bucket_bytes))
