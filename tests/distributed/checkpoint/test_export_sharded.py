"""``export`` streams the gathered HF tensors: a checkpoint saved at TP=2 is written as sharded
safetensors in HF's layout (index included) whose union is exactly the model's HF state, at
TP=2, PP=2 and DP=2; a bf16 checkpoint is exported in bf16 whatever the config says; and only the
writer rank keeps exported tensors (live tensor bytes measured at every bucket)."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from megatron_cegppo.testing.multiprocess import run_distributed
from megatron_cegppo.testing.tiny import save_tiny_task_model

pytestmark = pytest.mark.distributed

SHARD = 300_000  # bytes: the tiny model (~2 MB in fp32) takes several shards
BUCKET = 100_000


def _save_checkpoint(cfg, layout, dtype: str, step: int):
    """A perturbed copy of the HF model saved as the Trainer's checkpoints are (model part,
    trainer_state.json naming the run's dtype); returns the path and rank 0's HF reference."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_cegppo.checkpoint.megatron_state import SHARDING
    from megatron_cegppo.checkpoint.store import CheckpointStore
    from megatron_cegppo.config.loader import to_dict
    from megatron_cegppo.models import (
        build_gpt_from_hf, export_hf_weights, import_hf_weights, read_hf_config, read_hf_state,
    )

    arch, _, (chunk,), padded = build_gpt_from_hf(read_hf_config(cfg.model.path), tp=2, pp=1,
                                                  params_dtype=getattr(torch, dtype))
    import_hf_weights([chunk], read_hf_state(cfg.model.path), arch, padded)
    g = torch.Generator().manual_seed(10 + layout.rank)
    with torch.no_grad():
        for p in chunk.parameters():
            p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))
    reference = {name: t.clone() for name, t in export_hf_weights([chunk], arch)}
    store = CheckpointStore(f"{cfg.trainer.run_dir}/checkpoints")
    staging = store.staging_dir(step)
    if layout.rank == 0:
        (staging / "megatron").mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save({"model": chunk.sharded_state_dict(metadata=SHARDING)}, str(staging / "megatron"))
    dist.barrier()
    if layout.rank == 0:
        state = to_dict(cfg)
        state["model"]["dtype"] = dtype
        (staging / "trainer_state.json").write_text(json.dumps({"step": step, "config": state}))
        store.commit(step)
    dist.barrier()
    return store.root / f"step_{step:08d}", reference if layout.rank == 0 else None


def _live_storages() -> dict:
    """Every tensor storage the Python heap references: data pointer -> storage."""
    gc.collect()  # what is kept, not what awaits the cycle collector
    out = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr():
                out[storage.data_ptr()] = storage
    return out


def _measured(samples):
    """Wraps ``hf_weight_buckets``: at each bucket, the bytes of tensors alive beyond those of
    before the export's gathering began, and the bytes of the bucket itself; a last sample once
    the buckets are exhausted."""
    from megatron_cegppo.models import hf_io

    inner = hf_io.hf_weight_buckets

    def buckets(*args, **kwargs):
        # held until the end, so that no later tensor reuses one of their addresses
        before = _live_storages()
        for bucket in inner(*args, **kwargs):
            new = {ptr: s.nbytes() for ptr, s in _live_storages().items() if ptr not in before}
            mine = {t.untyped_storage().data_ptr() for _, t in bucket}
            samples.append((sum(new.values()), sum(new.get(ptr, 0) for ptr in mine)))
            yield bucket
            del bucket
        # every bucket consumed, the shard files not yet finished
        samples.append((sum(s.nbytes() for ptr, s in _live_storages().items() if ptr not in before), 0))
        del before

    return buckets


def worker(rank, world, overrides, tmp):
    from megatron.core import parallel_state

    from megatron_cegppo.checkpoint.export import export_checkpoint
    from megatron_cegppo.config import load_config
    from megatron_cegppo.models import hf_io
    from megatron_cegppo.trainer.distributed import init_distributed

    cfg = load_config("configs/tiny_cpu.yaml", overrides)
    layout = init_distributed(cfg)
    fp32_ckpt, fp32_ref = _save_checkpoint(cfg, layout, "float32", 1)
    bf16_ckpt, bf16_ref = _save_checkpoint(cfg, layout, "bfloat16", 2)

    parallel_state.destroy_model_parallel()
    samples = []
    original = hf_io.hf_weight_buckets
    hf_io.hf_weight_buckets = _measured(samples)
    try:
        export_checkpoint(cfg, fp32_ckpt, f"{tmp}/sharded", shard_size=SHARD, bucket_bytes=BUCKET)
    finally:
        hf_io.hf_weight_buckets = original

    parallel_state.destroy_model_parallel()  # the config says float32: the checkpoint's dtype wins
    export_checkpoint(cfg, bf16_ckpt, f"{tmp}/bf16", shard_size="5GB")

    parallel_state.destroy_model_parallel()
    cfg.parallel.tensor, cfg.parallel.pipeline = 1, 2
    export_checkpoint(cfg, fp32_ckpt, f"{tmp}/pp2", shard_size="1GB", bucket_bytes=BUCKET)
    return dict(fp32=fp32_ref, bf16=bf16_ref, samples=samples)


def dp2_worker(rank, world, overrides, tmp):
    """TP=1 x DP=2 in fresh processes (megatron's groups re-made in one process give both
    data-parallel ranks the same checkpoint replica id): rank 1 gathers nothing."""
    from megatron_cegppo.checkpoint.export import export_checkpoint
    from megatron_cegppo.config import load_config

    cfg = load_config("configs/tiny_cpu.yaml", overrides + ["parallel.tensor=1"])
    export_checkpoint(cfg, None, f"{tmp}/dp2", shard_size="600KB")  # the run's latest: the bf16 one


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_sharded")
    save_tiny_task_model(tmp / "model")
    overrides = [f"model.path={tmp / 'model'}", f"trainer.run_dir={tmp / 'run'}"]
    ranks = run_distributed(worker, 2, overrides, str(tmp), timeout=300)
    run_distributed(dp2_worker, 2, overrides, str(tmp), timeout=300)
    return tmp, ranks


def _nbytes(t):
    return t.numel() * t.element_size()


def test_shards_hold_exactly_the_model(exported):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_cegppo.models.hf_io import read_hf_state

    tmp, ranks = exported
    reference = ranks[0]["fp32"]
    out = tmp / "sharded"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n >= 4, files
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == files
    assert set(index["weight_map"]) == set(reference)
    assert index["metadata"]["total_size"] == sum(_nbytes(t) for t in reference.values())
    union = {}
    for file in files:
        shard = load_file(str(out / file))
        assert len(shard) == 1 or sum(_nbytes(t) for t in shard.values()) <= SHARD, file
        assert all(index["weight_map"][name] == file for name in shard), file
        assert not set(shard) & set(union)
        union.update(shard)
    assert set(union) == set(reference)
    for name, tensor in reference.items():
        assert union[name].dtype == torch.float32 and torch.equal(union[name], tensor), name
    assert set(read_hf_state(out)) == set(reference)
    state = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert not (tmp / ".sharded.tmp").exists()


@pytest.mark.parametrize("layout,files,dtype", [
    ("pp2", ["model.safetensors"], "fp32"),
    ("dp2", ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json"], "bf16"),
])
def test_other_layouts_export_the_same_tensors(exported, layout, files, dtype):
    from megatron_cegppo.models.hf_io import read_hf_state

    tmp, ranks = exported
    out = tmp / layout
    assert sorted(p.name for p in out.glob("*.safetensors*")) == files
    state = read_hf_state(out)
    assert set(state) == set(ranks[0][dtype])
    for name, tensor in ranks[0][dtype].items():
        assert torch.equal(state[name], tensor), name


def test_bf16_checkpoint_exports_bf16(exported):
    from transformers import AutoModelForCausalLM

    from megatron_cegppo.models.hf_io import read_hf_state

    tmp, ranks = exported
    out = tmp / "bf16"
    state = read_hf_state(out)
    assert set(state) == set(ranks[0]["bf16"])
    for name, tensor in ranks[0]["bf16"].items():
        assert tensor.dtype == torch.bfloat16 and state[name].dtype == torch.bfloat16, name
        assert torch.equal(state[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name].to(tensor.dtype)), name


def test_only_the_writer_keeps_exported_tensors(exported):
    """Live tensor bytes beyond the model at each bucket: rank 1 (a TP peer of the writer, which
    gathers every tensor too) holds the bucket in hand and the one tensor gathered ahead of it
    (at times the previous bucket's last one too), nothing that grows with the model; rank 0
    holds the shard being filled besides, never more than a shard."""
    tmp, ranks = exported
    largest = max(_nbytes(t) for t in ranks[0]["fp32"].values())
    biggest_full = 2 * largest  # megatron's fused gate/up weight is two HF tensors
    kept = {r: [extra - own for extra, own in ranks[r]["samples"]] for r in (0, 1)}
    assert len(kept[0]) == len(kept[1]) >= 8
    total = sum(_nbytes(t) for t in ranks[0]["fp32"].values())
    # besides the tensor gathered ahead, a sample may catch the previous bucket's last tensor
    # not yet released (seen under load, on both ranks): still far from the whole model
    assert max(kept[1]) <= 2 * biggest_full < total, (kept[1], total)
    assert kept[1][-1] == 0, "rank 1 still holds tensors once every bucket is consumed"
    # the measurement sees what the writer keeps: the last shard, pending until finished
    assert 0 < kept[0][-1] <= SHARD, kept[0]
    assert max(kept[0]) > biggest_full, kept[0]
    # the writer likewise, besides its pending shard: far from the whole model, which the old
    # export kept
    assert max(kept[0]) <= SHARD + 2 * biggest_full < total, (kept[0], total)
    print(f"kept beyond the bucket (bytes): rank 0 {kept[0]}, rank 1 {kept[1]}; "
          f"buckets: {[own for _, own in ranks[0]['samples']]}")
