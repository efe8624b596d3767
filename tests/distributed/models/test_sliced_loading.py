"""Loading from an HF folder with sliced reads (``import_hf_weights(chunks, folder, ...)``) gives
every parameter bitwise what the full-state path gives (``read_hf_state`` + the dict), at TP1,
TP2, PP2, TP2 x PP2 and PP2 x VPP2, for an untied Qwen2 in an indexed folder of several files
(fp32) and a tied Llama in a single file (bf16 on disk, bf16 parameters), both with padded
vocabularies. Each rank reads exactly the bytes of its own slices (no padding rows, no other
stage's layers): the TP ranks of one replica together read the model once, plus the
replicated norms once per extra TP rank (and, tied at PP > 1, the embedding a second time).

All layouts run in one launch of 4 processes (TP1 and the others with data-parallel copies)."""

from __future__ import annotations

import pytest
import torch

from megatron_cegppo.testing.multiprocess import run_distributed

pytestmark = pytest.mark.distributed

LAYOUTS = {"tp1": (1, 1, None), "tp2": (2, 1, None), "pp2": (1, 2, None), "tp2pp2": (2, 2, None),
           "pp2vpp2": (1, 2, 2)}
WORLD = 4
# name: (model type, tied, vocab, dtype on disk, files, parameter dtype)
MODELS = {"qwen2-untied-indexed": ("qwen2", False, 100, torch.float32, "200KB", torch.float32),
          "llama-tied-single": ("llama", True, 200, torch.bfloat16, None, torch.bfloat16)}


def save_hf(folder, model_type, tied, vocab, dtype, max_shard):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls_config, cls_model = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "llama": (LlamaConfig, LlamaForCausalLM)}[model_type]
    config = cls_config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        num_hidden_layers=4, intermediate_size=96, vocab_size=vocab, max_position_embeddings=64,
                        tie_word_embeddings=tied)
    torch.manual_seed(3)
    model = cls_model(config)
    with torch.no_grad():  # random norms and biases, so that a mis-mapped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": max_shard} if max_shard else {}))


class _CountingSlice:
    def __init__(self, inner, counter):
        self._inner, self._counter = inner, counter

    def __getitem__(self, index):
        t = self._inner[index]
        self._counter["bytes"] += t.numel() * t.element_size()
        return t

    def get_shape(self):
        return self._inner.get_shape()

    def get_dtype(self):
        return self._inner.get_dtype()


def _counting_safe_open(real, counter):
    class CountingOpen:
        def __init__(self, *args, **kwargs):
            self._inner = real(*args, **kwargs)

        def __enter__(self):
            self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def keys(self):
            return self._inner.keys()

        def get_slice(self, name):
            return _CountingSlice(self._inner.get_slice(name), counter)

        def get_tensor(self, name):
            raise AssertionError(f"the sliced path read the whole tensor {name}")
    return CountingOpen


def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def worker(rank, world, folders):
    import safetensors
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.models import build_gpt_from_hf, import_hf_weights, read_hf_config, read_hf_state
    from megatron_cegppo.models.sharding import global_named_parameters
    from megatron_cegppo.cpu_compat import apply_cpu_compat

    apply_cpu_compat()
    real_open = safetensors.safe_open
    out = {}
    for layout, (tp, pp, vpp) in LAYOUTS.items():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 virtual_pipeline_model_parallel_size=vpp)
        model_parallel_cuda_manual_seed(0)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        for key, (folder, file_bytes) in folders.items():
            params_dtype = MODELS[key][5]
            hf_config = read_hf_config(folder)
            arch, _, chunks, padded = build_gpt_from_hf(hf_config, tp=tp, pp=pp, vpp=vpp, params_dtype=params_dtype)
            import_hf_weights(chunks, read_hf_state(folder), arch, padded)  # the full-state path
            named = list(global_named_parameters(chunks))
            reference = [p.detach().clone() for _, p in named]
            for _, p in named:
                p.data.fill_(float("nan"))
            counter = {"bytes": 0}
            safetensors.safe_open = _counting_safe_open(real_open, counter)
            try:
                import_hf_weights(chunks, folder, arch, padded, read_chunk_bytes=4096)
            finally:
                safetensors.safe_open = real_open
            differ = [name for (name, p), ref in zip(named, reference)
                      if p.dtype != ref.dtype or not torch.equal(_bits(p.detach()), _bits(ref))]
            expected = 0  # the real (not padding) elements of this rank's slices, in the file's dtype
            replicated = 0
            for name, p in named:
                n = p.numel()
                if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                    rows = p.shape[0]
                    n = max(0, min(arch.vocab_size, (tp_rank + 1) * rows) - tp_rank * rows) * p.shape[1]
                elif not getattr(p, "tensor_model_parallel", False):
                    replicated += n * file_bytes
                expected += n * file_bytes
            out[(layout, key)] = dict(differ=differ, count=len(named), read=counter["bytes"], expected=expected,
                                      replicated=replicated, dp_rank=parallel_state.get_data_parallel_rank())
            del chunks, named, reference
        parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folders, sizes = {}, {}
    for key, (model_type, tied, vocab, dtype, max_shard, _) in MODELS.items():
        folder = tmp_path_factory.mktemp(key)
        save_hf(folder, model_type, tied, vocab, dtype, max_shard)
        folders[key] = (str(folder), torch.empty(0, dtype=dtype).element_size())
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        assert (len(files) > 1) == (max_shard is not None), files
        assert (folder / "model.safetensors.index.json").exists() == (max_shard is not None)
        from megatron_cegppo.models.hf_io import read_hf_state
        sizes[key] = sum(t.numel() * t.element_size() for t in read_hf_state(folder).values())
    ranks = run_distributed(worker, WORLD, folders, timeout=300)
    return ranks, sizes


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model", list(MODELS))
def test_sliced_folder_load_is_bitwise_the_full_state_load(loaded, layout, model):
    ranks, _ = loaded
    for rank, result in enumerate(ranks):
        r = result[(layout, model)]
        assert r["count"] > 0
        assert not r["differ"], f"{model} at {layout}, rank {rank}: {r['differ']}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model", list(MODELS))
def test_each_rank_reads_only_its_slices(loaded, layout, model):
    ranks, sizes = loaded
    tp, pp, _ = LAYOUTS[layout]
    tied = MODELS[model][1]
    replica = [r[(layout, model)] for r in ranks if r[(layout, model)]["dp_rank"] == 0]
    assert len(replica) == tp * pp
    for r in replica:
        assert r["read"] == r["expected"], r
        if tp * pp > 1:  # a TP/PP slice, not the model
            assert r["read"] < 0.7 * sizes[model], (r["read"], sizes[model])
    # together, one replica's ranks read the model once, the replicated norms once per extra
    # TP rank, and (tied embeddings at PP > 1) the embedding again on the last stage
    embedding = MODELS[model][2] * 64 * torch.empty(0, dtype=MODELS[model][3]).element_size()
    replicated_per_tp_rank = sum(r["replicated"] for r in replica) / tp
    total = sizes[model] + (tp - 1) * replicated_per_tp_rank + (embedding if tied and pp > 1 else 0)
    assert sum(r["read"] for r in replica) == total
