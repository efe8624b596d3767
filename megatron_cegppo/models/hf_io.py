"""Hugging Face folders in and out of megatron GPTModel chunks at any TP/PP layout."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from megatron_cegppo.config.schema import RolloutConfig
from megatron_cegppo.models.hf_config import HFArchitecture
from megatron_cegppo.models.sharding import (global_named_parameters, is_tp_sharded, load_full_state, tp_gather,
                                             tp_ranges)
from megatron_cegppo.models.weight_mapping import (hf_row_layout, hf_shapes, hf_to_megatron, megatron_names,
                                                   megatron_to_hf)


READ_CHUNK_BYTES = 64 << 20
BUCKET_BYTES = RolloutConfig().weight_bucket_bytes  # the run config's default
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
                "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


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


def import_hf_weights(
    chunks, source: Mapping[str, torch.Tensor] | str | Path, arch: HFArchitecture, padded_vocab: int,
    *, read_chunk_bytes: int = READ_CHUNK_BYTES,
) -> None:
    """Loads HF weights into this rank's chunks (its TP slice of its PP stage's layers).

    ``source`` is an HF folder (``str`` / ``Path``): each parameter's TP slice is read straight
    from the safetensors files (:func:`load_hf_folder_slices`), so a rank holds its own shard
    plus at most ``read_chunk_bytes`` of file pages at a time. Or an HF state dict of full
    tensors (e.g. :func:`read_hf_state`), which is mapped whole and then sliced."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_world = parallel_state.get_tensor_model_parallel_world_size()
    if isinstance(source, (str, Path)):
        load_hf_folder_slices(chunks, source, arch, padded_vocab, tp_rank, tp_world,
                              read_chunk_bytes=read_chunk_bytes)
        return
    full = hf_to_megatron(source, arch, padded_vocab)
    load_full_state(chunks, full, tp_rank, tp_world)


class SafetensorsFolder:
    """Lazy, sliced reads of the tensors of an HF folder: with a ``model.safetensors.index.json``
    or one or more ``*.safetensors`` files without one. Every read opens its file, copies its
    slice out of the memory map and closes it, so no more than one read's pages stay mapped."""

    def __init__(self, folder: str | Path):
        import safetensors

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        self.index = index if index.exists() else None
        if self.index is not None:
            self._file_of = dict(json.loads(index.read_text())["weight_map"])
        else:
            self._file_of = {}
            for path in sorted(self.folder.glob("*.safetensors")):
                with safetensors.safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        self._file_of.setdefault(key, path.name)
        if not self._file_of:
            raise FileNotFoundError(f"no .safetensors weights in {self.folder}")
        self._checked: dict[str, tuple[tuple[int, ...], str]] = {}

    def file_of(self, name: str) -> Path:
        if name not in self._file_of:
            where = self.index if self.index is not None else f"the .safetensors files of {self.folder}"
            raise KeyError(f"HF tensor {name!r} is missing: {where} does not list it")
        return self.folder / self._file_of[name]

    @contextlib.contextmanager
    def _slice(self, name: str):
        import safetensors

        path = self.file_of(name)
        with safetensors.safe_open(str(path), framework="pt") as f:
            if name not in self._checked and name not in set(f.keys()):
                raise KeyError(f"HF tensor {name!r} is missing from {path}")
            sl = f.get_slice(name)
            yield path, sl
            del sl

    def check(self, name: str, shape: tuple[int, ...]) -> str:
        """The file's dtype of tensor ``name`` (e.g. ``"BF16"``), after checking its shape."""
        if name not in self._checked:
            with self._slice(name) as (path, sl):
                got = tuple(sl.get_shape())
                if got != tuple(shape):
                    raise ValueError(f"HF tensor {name!r} in {path} has shape {list(got)}; "
                                     f"the config implies {list(shape)}")
                self._checked[name] = (got, sl.get_dtype())
        return self._checked[name][1]

    @torch.no_grad()
    def read_into(self, name: str, rows: tuple[int, int], cols: Optional[tuple[int, int]], out: torch.Tensor,
                  *, chunk_bytes: int = READ_CHUNK_BYTES) -> None:
        """Copies ``tensor[rows[0]:rows[1]]`` (and ``[:, cols[0]:cols[1]]``) into ``out``, a few
        rows at a time: at most ``chunk_bytes`` of full rows per read."""
        shape, dtype = self._checked[name]
        row_bytes = _DTYPE_BYTES.get(dtype, 8) * int(torch.Size(shape[1:]).numel())
        step = max(1, chunk_bytes // max(1, row_bytes))
        start, stop = rows
        for lo in range(start, stop, step):
            hi = min(stop, lo + step)
            with self._slice(name) as (_, sl):
                part = sl[lo:hi] if cols is None else sl[lo:hi, cols[0]:cols[1]]
                out[lo - start: hi - start].copy_(part)
                del part


def _take_rows(layout, ranges):
    """The pieces of ``layout`` (``(source, start, stop)`` row runs) that cover the full-tensor
    row ``ranges``, in order, with adjacent pieces of one source merged."""
    pieces: list[list] = []
    for a, b in ranges:
        offset = 0
        for src, s, e in layout:
            lo, hi = max(a, offset), min(b, offset + e - s)
            if lo < hi:
                start, stop = s + lo - offset, s + hi - offset
                if pieces and pieces[-1][0] == src and pieces[-1][2] == start:
                    pieces[-1][2] = stop
                else:
                    pieces.append([src, start, stop])
            offset += e - s
    return [tuple(p) for p in pieces]


@torch.no_grad()
def load_hf_param_slice(reader: SafetensorsFolder, name: str, param: torch.Tensor, arch: HFArchitecture,
                        padded_vocab: int, tp_rank: int, tp_world: int,
                        *, read_chunk_bytes: int = READ_CHUNK_BYTES) -> None:
    """Fills ``param`` (megatron parameter ``name``, TP1/PP1 name) with this TP rank's slice,
    reading only that slice from the folder: what :func:`tp_shard` cuts from
    :func:`hf_to_megatron`'s tensor, element for element."""
    layout = hf_row_layout(name, arch, padded_vocab)
    shapes = hf_shapes(arch)
    sources = [src for src, *_ in layout if src is not None]
    for src in dict.fromkeys(sources):
        reader.check(src, shapes[src])
    trailing = shapes[sources[0]][1:]
    full_rows = sum(e - s for _, s, e in layout)
    sharded = tp_world > 1 and is_tp_sharded(param)
    dim = param.partition_dim if sharded else None
    if dim not in (None, 0, 1) or (dim == 1 and not trailing):
        raise ValueError(f"{name}: no sliced read for partition_dim {dim} of a {1 + len(trailing)}-d tensor")
    row_ranges = tp_ranges(full_rows, param, tp_rank, tp_world) if dim == 0 else [(0, full_rows)]
    col_ranges = tp_ranges(trailing[0], param, tp_rank, tp_world) if dim == 1 else None
    local_shape = [sum(b - a for a, b in row_ranges), *trailing]
    if col_ranges is not None:
        local_shape[1] = sum(b - a for a, b in col_ranges)
    if tuple(local_shape) != tuple(param.shape):
        raise ValueError(f"{name}: weights of shape {tuple(local_shape)} for a parameter of {tuple(param.shape)}")
    row = 0
    for src, start, stop in _take_rows(layout, row_ranges):
        out = param.narrow(0, row, stop - start)
        if src is None:
            out.zero_()
        elif col_ranges is None:
            reader.read_into(src, (start, stop), None, out, chunk_bytes=read_chunk_bytes)
        else:
            col = 0
            for c0, c1 in col_ranges:
                reader.read_into(src, (start, stop), (c0, c1), out.narrow(1, col, c1 - c0),
                                 chunk_bytes=read_chunk_bytes)
                col += c1 - c0
        row += stop - start


def load_hf_folder_slices(chunks, folder: str | Path, arch: HFArchitecture, padded_vocab: int, tp_rank: int,
                          tp_world: int, *, read_chunk_bytes: int = READ_CHUNK_BYTES) -> None:
    """Reads each of this rank's parameters (its pipeline stage's layers, its TP slice) from an
    HF folder's safetensors files, never a whole model or (for sharded parameters) a whole tensor."""
    reader = SafetensorsFolder(folder)
    known = set(megatron_names(arch))
    for name, param in global_named_parameters(chunks):
        if name not in known:
            raise KeyError(f"no weights for parameter {name!r}")
        load_hf_param_slice(reader, name, param, arch, padded_vocab, tp_rank, tp_world,
                            read_chunk_bytes=read_chunk_bytes)


def _full_shape(param: torch.Tensor, tp_world: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if is_tp_sharded(param):
        shape[param.partition_dim] *= tp_world
    return tuple(shape)


def export_hf_weights(chunks, arch: HFArchitecture, *, bucket_bytes: int = BUCKET_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor)`` pairs of the whole model, on every rank, gathered one bucket
    at a time (see :func:`hf_weight_buckets`). Every rank of the TP and PP groups must consume
    the iterator in step."""
    for bucket in hf_weight_buckets(chunks, arch, bucket_bytes=bucket_bytes):
        yield from bucket


@torch.no_grad()
def hf_weight_buckets(chunks, arch: HFArchitecture, *, bucket_bytes: int = BUCKET_BYTES) -> Iterator[list]:
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
