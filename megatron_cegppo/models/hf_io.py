"""Hugging Face folders in and out of megatron GPTModel chunks at any TP/PP layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from megatron_cegppo.models.hf_config import HFArchitecture
from megatron_cegppo.models.sharding import global_named_parameters, is_tp_sharded, load_full_state, tp_gather
from megatron_cegppo.models.weight_mapping import hf_to_megatron, megatron_names, megatron_to_hf


def read_hf_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder's safetensors file(s), on the CPU."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    return state


def read_hf_config(folder: str | Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


def import_hf_weights(chunks, hf_state: dict[str, torch.Tensor], arch: HFArchitecture, padded_vocab: int) -> None:
    """Loads HF weights into this rank's chunks (its TP slice of its PP stage's layers)."""
    from megatron.core import parallel_state

    full = hf_to_megatron(hf_state, arch, padded_vocab)
    load_full_state(
        chunks, full,
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def _full_shape(param: torch.Tensor, tp_world: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if is_tp_sharded(param):
        shape[param.partition_dim] *= tp_world
    return tuple(shape)


def export_hf_weights(chunks, arch: HFArchitecture, *, bucket_bytes: int = 256 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor)`` pairs of the whole model, on every rank, gathered one bucket
    at a time (see :func:`hf_weight_buckets`). Every rank of the TP and PP groups must consume
    the iterator in step."""
    for bucket in hf_weight_buckets(chunks, arch, bucket_bytes=bucket_bytes):
        yield from bucket


@torch.no_grad()
def hf_weight_buckets(chunks, arch: HFArchitecture, *, bucket_bytes: int = 256 << 20) -> Iterator[list]:
    """Lists of ``(hf_name, full tensor)`` of at most ``bucket_bytes`` each, or one tensor
    when a tensor is larger: each parameter is gathered over its TP group and broadcast from
    the pipeline stage that holds it, so no rank materialises the whole model at once."""
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_world = parallel_state.get_tensor_model_parallel_world_size()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_world = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()

    local: dict[str, torch.Tensor] = {}
    for name, param in global_named_parameters(chunks):
        local.setdefault(name, param)
    meta = {name: (_full_shape(p, tp_world), p.dtype) for name, p in local.items()}
    stage_meta = [meta]
    if pp_world > 1:
        stage_meta = [None] * pp_world
        dist.all_gather_object(stage_meta, meta, group=pp_group)

    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    device = next(iter(local.values())).device
    for name in megatron_names(arch):
        owner = next((r for r, m in enumerate(stage_meta) if name in m), None)
        if owner is None:
            raise KeyError(f"no pipeline stage holds {name!r}")
        if owner == pp_rank:
            full = tp_gather(local[name].detach(), local[name], tp_group)
        else:
            shape, dtype = stage_meta[owner][name]
            full = torch.empty(shape, dtype=dtype, device=device)
        if pp_world > 1:
            dist.broadcast(full, src=dist.get_global_rank(pp_group, owner), group=pp_group)
        nbytes = full.numel() * full.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.extend(megatron_to_hf(name, full, arch))
        size += nbytes
    if bucket:
        yield bucket
