"""A real vLLM-CPU engine: every weight push (layer-wise reload) warns "RotaryEmbedding: Failed
to load weights" without the filter and not with it, other warnings of that logger still pass;
and pushing unchanged weights leaves the prompt log-probs unchanged (a changed push does not)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from megatron_cegppo.testing.multiprocess import run_distributed

pytestmark = pytest.mark.distributed

PROMPTS = [[1, 2, 3, 4, 5], [6, 7, 8]]


def worker(rank, world, folder):
    from safetensors.torch import load_file

    from megatron_cegppo.rollout import EngineConfig, RolloutEngine
    from megatron_cegppo.rollout.vllm_compat import RELOAD_LOGGER, BufferOnlyReloadFilter

    engine = RolloutEngine(folder, EngineConfig(max_model_len=32, kv_cache_bytes=8 << 20), seed=0,
                           skip_tokenizer_init=True)
    weights = load_file(str(Path(folder) / "model.safetensors"))
    logger = logging.getLogger(RELOAD_LOGGER)
    quiet = next(f for f in logger.filters if isinstance(f, BufferOnlyReloadFilter))
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(r.getMessage())
    logger.addHandler(handler)

    before = engine.prompt_logprobs(PROMPTS)
    logger.removeFilter(quiet)
    engine.push_weights(iter(weights.items()))
    without = list(seen)
    seen.clear()
    logger.addFilter(quiet)
    engine.push_weights(iter(weights.items()))
    logger.warning("%s: Failed to load weights", "QKVParallelLinear")
    with_filter = list(seen)
    same = engine.prompt_logprobs(PROMPTS)
    engine.push_weights((k, v + 0.05) for k, v in weights.items())
    changed = engine.prompt_logprobs(PROMPTS)
    return dict(without=without, with_filter=with_filter, before=before, same=same, changed=changed)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                                 num_hidden_layers=1, intermediate_size=64, vocab_size=50,
                                 max_position_embeddings=32)).save_pretrained(path)
    return str(path)


def test_reload_warning_filtered_and_logprobs_kept(folder):
    [r] = run_distributed(worker, 1, folder, timeout=300)
    assert "RotaryEmbedding: Failed to load weights" in r["without"], (
        f"vLLM no longer warns on reload ({r['without']}): quiet_buffer_only_reload_warnings can go")
    assert not any("RotaryEmbedding: Failed" in m for m in r["with_filter"]), r["with_filter"]
    assert "QKVParallelLinear: Failed to load weights" in r["with_filter"]
    assert [len(p) for p in r["before"]] == [len(p) - 1 for p in PROMPTS]
    assert r["same"] == r["before"]
    assert r["changed"] != r["before"]
