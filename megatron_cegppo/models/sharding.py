"""Moving full (TP1/PP1) parameter tensors in and out of this rank's model chunks.

megatron splits a tensor-parallel parameter along ``partition_dim`` into
``world * partition_stride`` pieces and gives rank ``r`` pieces ``r, r + world, ...``
(``_initialize_affine_weight_cpu``); SwiGLU's fc1 uses stride 2 so each rank holds its own
[gate; up] rows. Layer indices are local to a pipeline stage; ``layer_number`` is global.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from megatron_cegppo.models.gpt import unwrap_model
from megatron_cegppo.models.weight_mapping import canonical_name


def global_named_parameters(chunks) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(TP1/PP1 local-spec name, parameter) for this rank's chunks. The last stage's copy
    of tied embeddings (pipeline-parallel only) is named as the embedding."""
    for chunk in chunks:
        chunk = unwrap_model(chunk)
        for name, param in chunk.named_parameters():
            parts = name.split(".")
            if parts[:2] == ["decoder", "layers"]:
                parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
            elif name == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
                parts = ["embedding", "word_embeddings", "weight"]
            yield canonical_name(".".join(parts)), param


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def tp_shard(full: torch.Tensor, param: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of a full tensor, as megatron lays it out."""
    if world == 1 or not is_tp_sharded(param):
        return full
    dim, stride = param.partition_dim, param.partition_stride
    if full.shape[dim] % (world * stride):
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not split into {world}x{stride}")
    pieces = torch.split(full, full.shape[dim] // (world * stride), dim=dim)
    return torch.cat(pieces[rank::world], dim=dim)


def tp_ranges(size: int, param: torch.Tensor, rank: int, world: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` index ranges along ``param.partition_dim`` (of a full dimension of
    ``size``) that :func:`tp_shard` gives this rank, in the order it concatenates them."""
    if world == 1 or not is_tp_sharded(param):
        return [(0, size)]
    stride = param.partition_stride
    if size % (world * stride):
        raise ValueError(f"dimension {param.partition_dim} of size {size} does not split into {world}x{stride}")
    piece = size // (world * stride)
    return [(i * piece, (i + 1) * piece) for i in range(rank, world * stride, world)]


def tp_gather(local: torch.Tensor, param: torch.Tensor, group) -> torch.Tensor:
    """The full tensor from every tensor-parallel rank's slice (inverse of :func:`tp_shard`)."""
    world = dist.get_world_size(group) if group is not None else 1
    if world == 1 or not is_tp_sharded(param):
        return local
    shards = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(shards, local.contiguous(), group=group)
    dim, stride = param.partition_dim, param.partition_stride
    per_rank = [torch.chunk(s, stride, dim=dim) for s in shards]
    return torch.cat([per_rank[r][j] for j in range(stride) for r in range(world)], dim=dim)


@torch.no_grad()
def load_full_state(chunks, full_state: dict[str, torch.Tensor], tp_rank: int, tp_world: int) -> None:
    """Copies each parameter's slice of ``full_state`` (TP1/PP1 names) into this rank's chunks."""
    for name, param in global_named_parameters(chunks):
        if name not in full_state:
            raise KeyError(f"no weights for parameter {name!r}")
        local = tp_shard(full_state[name], param, tp_rank, tp_world)
        if local.shape != param.shape:
            raise ValueError(f"{name}: weights of shape {tuple(local.shape)} for a parameter of {tuple(param.shape)}")
        param.copy_(local)
