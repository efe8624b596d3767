"""A Hugging Face folder (sharded safetensors, config, tokenizer) from a checkpoint at any layout.

The model is built in the checkpoint's dtype and its HF tensors are gathered one bucket at a
time (:func:`megatron_cegppo.models.hf_io.hf_weight_buckets`): every rank of the TP and PP
groups takes part in each gather, only global rank 0 keeps anything. It moves each bucket to
the CPU and writes ``model-0000k-of-0000N.safetensors`` files of at most ``shard_size`` bytes
(one tensor larger than that gets a file of its own) and ``model.safetensors.index.json``, HF's
layout; everything in one file is written as ``model.safetensors``. Host memory on the writer
is about one shard plus one bucket; a rank's device memory about one bucket beyond the model
(the bucket in hand and the next tensor gathered).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from megatron_cegppo.config import Config

# Files of the starting model's folder that describe it rather than hold weights.
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
           "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
           "chat_template.jinja", "added_tokens.json")

DEFAULT_SHARD_SIZE = "5GB"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = ("float32", "bfloat16")
# decimal units as HF's ``max_shard_size`` ("5GB" = 5e9 bytes), binary ones with "i"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_shard_size(value) -> int:
    """Bytes of ``value``: an int, or a string like ``5GB``, ``500MB``, ``2GiB``, ``1048576``.
    A value that is not positive or not understood raises ``ValueError`` naming it."""
    if isinstance(value, bool):
        raise ValueError(f"--shard-size {value!r}: expected a size such as 5GB, 500MB or a number of bytes")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"--shard-size {value!r}: expected a size such as 5GB, 500MB or a number of bytes")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"--shard-size {value!r}: must be positive")
    return size


def _format_bytes(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def checkpoint_dtype(checkpoint: Path, default: str) -> str:
    """The run's ``model.dtype`` from the checkpoint's ``trainer_state.json``, else ``default``."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        dtype = state["config"]["model"]["dtype"]
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return default
    if dtype not in _DTYPES:
        raise ValueError(f"{checkpoint}: model.dtype {dtype!r} in trainer_state.json, expected one of {_DTYPES}")
    return dtype


def load_model_weights(model_chunks, directory: Path) -> None:
    """Only the model part of a ``dist_checkpointing`` checkpoint (no optimizer needed)."""
    from megatron.core import dist_checkpointing

    from megatron_cegppo.checkpoint.megatron_state import SHARDING
    from megatron_cegppo.models.gpt import unwrap_model

    chunks = [unwrap_model(c) for c in model_chunks]
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    request = {k: c.sharded_state_dict(metadata=SHARDING) for k, c in zip(keys, chunks)}
    loaded = dist_checkpointing.load(request, str(directory), strict="assume_ok_unexpected")
    for key, chunk in zip(keys, chunks):
        chunk.load_state_dict(loaded[key], strict=True)


class ShardWriter:
    """Packs ``(name, CPU tensor)`` pairs, in order, into safetensors files of at most
    ``shard_size`` bytes in ``folder``; :meth:`finish` names them and writes the index."""

    def __init__(self, folder: Path, shard_size: int, log=print):
        self.folder = Path(folder)
        self.shard_size = shard_size
        self.log = log
        self.pending: dict = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # the tensor names of each written shard
        self.total_size = 0
        self.names: set[str] = set()

    def add(self, name: str, tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if name in self.names:
            raise ValueError(f"tensor {name!r} exported twice")
        self.names.add(name)
        if self.pending and self.pending_bytes + nbytes > self.shard_size:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += nbytes
        self.total_size += nbytes

    def add_bucket(self, bucket) -> None:
        """Copies a bucket's tensors to the CPU and keeps no reference to the bucket."""
        for name, tensor in bucket:
            self.add(name, _to_cpu(tensor))

    def _part(self, index: int) -> Path:
        return self.folder / f".shard-{index + 1:05d}.part"

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, str(self._part(len(self.shards))), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.log(f"[megatron-cegppo] export: shard {len(self.shards)} written "
                 f"({len(self.pending)} tensors, {_format_bytes(self.pending_bytes)})")
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """The file names written (``model.safetensors`` alone when one shard holds it all)."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self._part(0), self.folder / SINGLE)
            return [SINGLE]
        files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for i, (file, names) in enumerate(zip(files, self.shards)):
            os.replace(self._part(i), self.folder / file)
            weight_map.update(dict.fromkeys(names, file))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files + [INDEX]


def _to_cpu(tensor):
    """A contiguous CPU tensor owning exactly its bytes (a view of a larger tensor, e.g. the
    vocabulary rows of a padded embedding, would keep the whole storage alive)."""
    import torch

    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def _copy_model_files(source: Path, staging: Path, dtype: str) -> None:
    for name in _COPIED:
        if (source / name).exists():
            shutil.copy2(source / name, staging / name)
    config = staging / "config.json"
    if config.exists():  # the config describes the weights written (vLLM's dtype="auto" reads it)
        data = json.loads(config.read_text())
        keys = [k for k in ("dtype", "torch_dtype") if k in data] or ["torch_dtype"]
        if any(data.get(k) != dtype for k in keys):
            for k in keys:
                data[k] = dtype
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


EXPORT_MARKER = ".megatron-cegppo-export"


def check_export_target(out, *, force: bool = False) -> None:
    """``out`` may be replaced: absent, empty, or an earlier export of this project (its marker
    file says so); anything else (a run directory, a model folder) only with ``force``.
    Raises ``ValueError`` naming the folder."""
    out = Path(out)
    if not out.exists() or force:
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise ValueError(f"--out {out} is not empty and not an earlier export (no {EXPORT_MARKER}): it would be "
                         "replaced whole; choose another folder or pass --force")


def _require_checkpoint(path: Path) -> None:
    """A clear word for a folder that is not a checkpoint at all (before the store's checks)."""
    from megatron_cegppo.checkpoint.store import MANIFEST, CheckpointError

    if not path.is_dir():
        raise CheckpointError(f"--checkpoint {path}: no such folder")
    if not (path / MANIFEST).exists() and not (path / "megatron").is_dir():
        raise CheckpointError(f"--checkpoint {path} is not a checkpoint of this project (no {MANIFEST}, no megatron/); "
                              "checkpoints are the step_* folders under <run_dir>/checkpoints")


def export_checkpoint(cfg: Config, checkpoint: Path | None, out: Path, *,
                      shard_size=DEFAULT_SHARD_SIZE, bucket_bytes: Optional[int] = None, force: bool = False) -> Path:
    """Writes ``out`` from ``checkpoint`` (default: the run directory's latest). Every rank
    of the job calls it; global rank 0 writes. ``shard_size``: bytes or a string such as
    ``5GB``; ``bucket_bytes``: the gather granularity (default: ``rollout.weight_bucket_bytes``,
    at most ``shard_size``)."""
    import torch
    import torch.distributed as dist

    from megatron_cegppo.checkpoint.store import CheckpointError, CheckpointStore
    from megatron_cegppo.models import build_gpt_from_hf, read_hf_config
    from megatron_cegppo.models import hf_io
    from megatron_cegppo.platform import init_distributed

    shard_bytes = parse_shard_size(shard_size)
    check_export_target(out, force=force)
    if bucket_bytes is None:
        bucket_bytes = min(cfg.rollout.weight_bucket_bytes, shard_bytes)
    layout = init_distributed(cfg)
    store = CheckpointStore(Path(cfg.trainer.run_dir) / "checkpoints")
    path = Path(checkpoint) if checkpoint else store.latest()
    if path is None:
        raise CheckpointError(f"no complete checkpoint under {store.root}")
    _require_checkpoint(path)
    store.verify(path)
    dtype = checkpoint_dtype(path, cfg.model.dtype)
    p = cfg.parallel
    arch, _, chunks, _ = build_gpt_from_hf(read_hf_config(cfg.model.path), tp=p.tensor, pp=p.pipeline,
                                           vpp=p.virtual_pipeline, params_dtype=getattr(torch, dtype))
    load_model_weights(chunks, path / "megatron")
    out = Path(out)
    writer_rank = layout.rank == 0
    staging = out.with_name(f".{out.name}.tmp")
    writer = None
    if writer_rank:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        writer = ShardWriter(staging, shard_bytes, log=lambda line: print(line, flush=True))
    # Data-parallel replicas other than the first share no TP/PP group with the writer: they
    # hold the same weights and need not gather them.
    if layout.dp_rank == 0:
        for bucket in hf_io.hf_weight_buckets(chunks, arch, bucket_bytes=bucket_bytes):
            if writer is not None:
                writer.add_bucket(bucket)
            del bucket  # nothing of it is left on the device before the next gather
    del chunks
    if writer_rank:
        files = writer.finish()
        _copy_model_files(Path(cfg.model.path), staging, dtype)
        (staging / EXPORT_MARKER).write_text(json.dumps({"checkpoint": str(path), "dtype": dtype}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
        print(f"[megatron-cegppo] exported {path} -> {out} ({dtype}, {len(writer.shards)} shard(s), "
              f"{_format_bytes(writer.total_size)}; {', '.join(files[:3])}{' ...' if len(files) > 3 else ''})",
              flush=True)
    if dist.is_initialized() and layout.world > 1:
        dist.barrier()
    return out
