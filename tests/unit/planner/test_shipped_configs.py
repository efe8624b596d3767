"""The GPU configs validate without a GPU: layout against the model's shape, world size,
vocabulary padding, and the planner says they fit; the architectures they name have the
parameter counts HF transformers builds from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_cegppo.config import load_config, validate
from megatron_cegppo.config.schema import training_positions
from megatron_cegppo.models.hf_config import padded_vocab_size
from megatron_cegppo.planner import kv_cache_bytes_per_token, make_plan, read_architecture, total_parameters, vllm_weight_bytes
from megatron_cegppo.planner.plan import layout_problems

ROOT = Path(__file__).resolve().parents[3]
GPU_CONFIGS = ["deepseek_r1_distill_qwen_1p5b", "deepseek_r1_distill_qwen_7b", "qwen2p5_32b", "llama3p1_70b"]
# parameters as the model cards state them (billions, rounded)
CARD_PARAMETERS = {"deepseek_r1_distill_qwen_1p5b": 1.78, "deepseek_r1_distill_qwen_7b": 7.62,
                   "qwen2p5_32b": 32.76, "llama3p1_70b": 70.55}


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name their architecture files relative to the repo


def load(name):
    return load_config(ROOT / "configs" / f"{name}.yaml")


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_config_validates_at_its_world_size(name):
    cfg = load(name)
    world = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    validate(cfg, world)
    arch = read_architecture(cfg)
    assert layout_problems(cfg, arch, world) == []
    p = cfg.parallel
    assert world % (p.tensor * p.pipeline) == 0 and p.tensor <= cfg.cluster.gpus_per_node  # TP inside a node
    assert arch.num_layers % (p.pipeline * (p.virtual_pipeline or 1)) == 0
    assert arch.num_heads % p.tensor == 0 and arch.num_kv_heads % p.tensor == 0
    padded = padded_vocab_size(arch.vocab_size, p.tensor)
    assert padded % (128 * p.tensor) == 0 and 0 <= padded - arch.vocab_size < 128 * p.tensor
    assert cfg.model.dtype == "bfloat16" and cfg.rollout.max_model_len <= arch.max_position_embeddings


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_config_fits_on_h100s(name):
    cfg = load(name)
    plan = make_plan(cfg, read_architecture(cfg))
    assert plan.fits, name
    assert plan.training_total <= 0.85 * plan.gpu_memory and plan.generation_total <= 0.85 * plan.gpu_memory
    assert plan.generation.concurrent_sequences >= 8  # vLLM batches enough sequences to be efficient


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_architecture_matches_hf_transformers(name):
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    data = json.loads((ROOT / "configs" / "models" / f"{name}.json").read_text())
    hf = AutoConfig.for_model(**data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    count = sum(p.numel() for p in model.parameters())
    arch = read_architecture(load(name))
    assert total_parameters(arch) == count
    assert round(count / 1e9, 2) == CARD_PARAMETERS[name]
    # vLLM at TP 1 holds every weight once, in bf16 (these vocabularies need no padding to 64)
    assert vllm_weight_bytes(arch, 1) == 2 * count


def test_kv_cache_per_token_of_a_32b_model():
    # 64 layers x K and V x 8 KV heads x 128 x bf16 = 256 KiB per token; 32 KiB at TP 8
    cfg = load("qwen2p5_32b")
    arch = read_architecture(cfg)
    assert kv_cache_bytes_per_token(arch, 1) == 256 << 10
    assert kv_cache_bytes_per_token(arch, 8) == 32 << 10
    # fewer KV heads than ranks: each rank keeps a whole head
    assert kv_cache_bytes_per_token(arch, 16) == kv_cache_bytes_per_token(arch, 8)


def test_a_layout_that_does_not_fit_is_reported():
    cfg = load("llama3p1_70b")
    cfg.parallel.pipeline = 2  # half the stages: twice the weights per GPU
    plan = make_plan(cfg, read_architecture(cfg), nodes=4)
    assert not plan.fits and plan.generation_total > plan.gpu_memory


def test_shape_problems_are_named():
    cfg = load("qwen2p5_32b")
    cfg.parallel.tensor, cfg.parallel.pipeline, cfg.rollout.max_model_len = 16, 3, 40000
    found = layout_problems(cfg, read_architecture(cfg), 32)
    assert any("64 layers do not split over pipeline 3" in p for p in found)
    assert any("parallel.tensor 16 does not divide the 40 attention heads" in p for p in found)
    assert any("exceeds the model's max_position_embeddings 32768" in p for p in found)
    assert any("32 GPUs do not split into tensor 16 x pipeline 3" in p for p in found)


def test_plan_uses_the_trainers_padded_sequence_length():
    cfg = load("qwen2p5_32b")
    cfg.algorithm.max_tokens_per_microbatch = None
    cfg.rollout.max_model_len = 17000  # the trainer pads to a multiple of 8 x TP = 64
    assert make_plan(cfg, read_architecture(cfg)).seq_len == 17024
    cfg.algorithm.max_tokens_per_microbatch = 17000  # a packed row: the budget, padded the same way
    plan = make_plan(cfg, read_architecture(cfg))
    assert (plan.seq_len, plan.micro_batch, plan.packed) == (17024, 1, True)


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_shipped_configs_pack_at_a_budget_holding_the_longest_sequence(name):
    cfg = load(name)
    budget = cfg.algorithm.max_tokens_per_microbatch
    assert budget is not None and budget >= training_positions(cfg)


def test_the_longest_training_sequence_leaves_validation_its_longer_responses():
    cfg = load("deepseek_r1_distill_qwen_7b")  # the authors': prompts 4096 + responses 16384, validation 32768
    assert (cfg.rollout.max_model_len, training_positions(cfg)) == (36864, 4096 + 16384 - 1)
    cfg.data.max_prompt_tokens = None  # the prompts get what the model leaves beside a response
    assert training_positions(cfg) == cfg.rollout.max_model_len - 1
