"""Model and optimizer state through megatron-core's ``dist_checkpointing``, in the layout-free
form (``fully_reshardable``): a checkpoint saved at one TP/PP/DP layout loads at another."""

from __future__ import annotations

from pathlib import Path

from megatron_cegppo.models.gpt import unwrap_model
from megatron_cegppo.checkpoint.optimizer_compat import (
    materialize_adam_state,
    patch_set_main_param_and_optimizer_states,
    unshare_adam_steps,
    uses_torch_adam,
)

SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


def _sharded_state_dict(model_chunks, optimizer, *, is_loading: bool) -> dict:
    model_chunks = [unwrap_model(c) for c in model_chunks]
    if len(model_chunks) == 1:
        models = {"model": model_chunks[0].sharded_state_dict(metadata=SHARDING)}
    else:
        models = {f"model{i}": c.sharded_state_dict(metadata=SHARDING) for i, c in enumerate(model_chunks)}
    merged = {k: v for sd in models.values() for k, v in sd.items()}
    return {**models, "optimizer": optimizer.sharded_state_dict(merged, is_loading=is_loading, metadata=SHARDING)}


def save_model_and_optimizer(model_chunks, optimizer, directory: Path) -> None:
    """Every rank calls it; ``directory`` must exist and be empty. A stop signal during it
    does not break it (see :mod:`megatron_cegppo.checkpoint.save_compat`)."""
    from megatron.core import dist_checkpointing

    from megatron_cegppo.checkpoint.save_compat import install_results_queue

    install_results_queue()
    dist_checkpointing.save(_sharded_state_dict(model_chunks, optimizer, is_loading=False), str(directory))


def load_model_and_optimizer(model_chunks, optimizer, directory: Path) -> None:
    from megatron.core import dist_checkpointing

    if uses_torch_adam():
        patch_set_main_param_and_optimizer_states()
        materialize_adam_state(optimizer)
    loaded = dist_checkpointing.load(_sharded_state_dict(model_chunks, optimizer, is_loading=True),
                                     str(directory), strict="assume_ok_unexpected")
    chunks = [unwrap_model(c) for c in model_chunks]
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"], strict=True)
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[f"model{i}"], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    if uses_torch_adam():
        unshare_adam_steps(optimizer)
