"""Tensor/pipeline-parallel pieces: vocab-parallel log-probs and entropy, the pipeline loss,
and the CPU compatibility layer for megatron-core. Imported on first use (see
:mod:`megatron_cegppo.models`)."""

from importlib import import_module

_HOMES = {name: "vocab_parallel" for name in
          ("VocabShard", "fused_vocab_parallel_logprobs_entropy", "vocab_parallel_logprobs_entropy")}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
