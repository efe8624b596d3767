"""A Hugging Face folder (safetensors, config, tokenizer) from a checkpoint at any layout."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from megatron_cegppo.config import Config

# Files of the starting model's folder that describe it rather than hold weights.
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
           "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
           "chat_template.jinja", "added_tokens.json")


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


def export_checkpoint(cfg: Config, checkpoint: Path | None, out: Path) -> Path:
    """Writes ``out`` from ``checkpoint`` (default: the run directory's latest). Every rank
    of the job calls it; rank 0 writes."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from megatron_cegppo.checkpoint.store import CheckpointError, CheckpointStore
    from megatron_cegppo.models import build_gpt_from_hf, export_hf_weights, read_hf_config
    from megatron_cegppo.trainer.distributed import init_distributed

    layout = init_distributed(cfg)
    store = CheckpointStore(Path(cfg.trainer.run_dir) / "checkpoints")
    path = Path(checkpoint) if checkpoint else store.latest()
    if path is None:
        raise CheckpointError(f"no complete checkpoint under {store.root}")
    store.verify(path)
    p = cfg.parallel
    arch, _, chunks, _ = build_gpt_from_hf(read_hf_config(cfg.model.path), tp=p.tensor, pp=p.pipeline,
                                           vpp=p.virtual_pipeline)
    load_model_weights(chunks, path / "megatron")
    tensors = {name: t.contiguous() for name, t in export_hf_weights(chunks, arch)}
    out = Path(out)
    if layout.rank == 0:
        staging = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        for name in _COPIED:
            if (Path(cfg.model.path) / name).exists():
                shutil.copy2(Path(cfg.model.path) / name, staging / name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
        print(f"[megatron-cegppo] exported {path} -> {out}", flush=True)
    if dist.is_initialized() and layout.world > 1:
        dist.barrier()
    return out
