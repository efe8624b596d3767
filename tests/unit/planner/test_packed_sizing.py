"""Packed micro-batches (``algorithm.max_tokens_per_microbatch``) in the planner: one row of the
budget, sized like an unpacked micro-batch of 1 x budget, with the block-diagonal mask of
unfused attention counted once per micro-batch in flight; the number of micro-batches per
optimizer step under the stated length assumption; the budget in the plan's header."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_cegppo.config import ConfigError, load_config, validate
from megatron_cegppo.config.schema import RECOMPUTE_MODES
from megatron_cegppo.models.hf_config import HFArchitecture, padded_vocab_size
from megatron_cegppo.planner import (
    MEGATRON_LOCAL,
    TRANSFORMER_ENGINE,
    format_plan,
    head_buffer_bytes,
    layer_activation_bytes,
    make_plan,
    packed_mask_bytes,
    packed_microbatches,
    pipeline_in_flight,
    read_architecture,
    stage_activation_bytes,
)

ROOT = Path(__file__).resolve().parents[3]
T = 4096


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


def arch() -> HFArchitecture:
    return HFArchitecture(model_type="qwen2", vocab_size=151936, hidden_size=1024, num_layers=8, num_heads=16,
                          num_kv_heads=4, head_dim=64, ffn_hidden_size=2816, rms_norm_eps=1e-6, rope_theta=1e6,
                          max_position_embeddings=32768, qkv_bias=True, tie_word_embeddings=False)


def load(name):
    return load_config(ROOT / "configs" / f"{name}.yaml")


@pytest.mark.parametrize("recompute", RECOMPUTE_MODES)
@pytest.mark.parametrize("tp,sp", [(1, False), (4, False), (4, True)])
def test_packed_under_flash_attention_is_an_unpacked_row_of_the_budget(tp, sp, recompute):
    kw = dict(layers=8, seq_len=T, micro_batch=1, tp=tp, sequence_parallel=sp, recompute=recompute, in_flight=3,
              impl=TRANSFORMER_ENGINE)
    assert stage_activation_bytes(arch(), packed=True, **kw) == stage_activation_bytes(arch(), **kw)
    assert packed_mask_bytes(T, TRANSFORMER_ENGINE) == 0  # THD: cu_seqlens, no mask


def test_packed_under_flash_attention_keeps_nothing_quadratic():
    one = layer_activation_bytes(arch(), seq_len=T, micro_batch=1, packed=True).total
    two = layer_activation_bytes(arch(), seq_len=2 * T, micro_batch=1, packed=True).total
    assert two == 2 * one


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_packed_local_layers_keep_the_scores_and_share_the_micro_batchs_mask(recompute):
    packed = layer_activation_bytes(arch(), seq_len=T, micro_batch=1, recompute=recompute, impl=MEGATRON_LOCAL,
                                    packed=True)
    unpacked = layer_activation_bytes(arch(), seq_len=T, micro_batch=1, recompute=recompute, impl=MEGATRON_LOCAL)
    assert packed.attention_scores == unpacked.attention_scores
    # no causal mask of the layer's own (unpacked: one [s, s] bool per layer, not under selective)
    assert unpacked.total - packed.total == (T * T if recompute == "none" else 0)


@pytest.mark.parametrize("recompute", RECOMPUTE_MODES)
def test_packed_local_stage_holds_one_mask_per_micro_batch_in_flight(recompute):
    kw = dict(layers=8, seq_len=T, micro_batch=1, tp=2, sequence_parallel=True, recompute=recompute,
              in_flight=3, impl=MEGATRON_LOCAL)
    per_layer = layer_activation_bytes(arch(), seq_len=T, micro_batch=1, tp=2, sequence_parallel=True,
                                       recompute="none" if recompute == "full" else recompute, impl=MEGATRON_LOCAL,
                                       packed=True).total
    layers = 8 * 3 * 2 * T * 1024 // 2 + per_layer if recompute == "full" else 8 * 3 * per_layer
    assert stage_activation_bytes(arch(), packed=True, **kw) == layers + 3 * T * T
    assert packed_mask_bytes(T, MEGATRON_LOCAL) == T * T  # bool


def test_a_packed_micro_batch_is_one_row():
    with pytest.raises(ValueError, match="one row"):
        layer_activation_bytes(arch(), seq_len=T, micro_batch=2, packed=True)


def test_micro_batches_per_step_assume_sequences_of_one_length():
    # the longest sequences: one per micro-batch below twice their length
    assert packed_microbatches(sequences=128, budget=17408, sequence_tokens=17407) == 128
    assert packed_microbatches(sequences=128, budget=32768, sequence_tokens=17407) == 128
    assert packed_microbatches(sequences=128, budget=34814, sequence_tokens=17407) == 64
    # shorter: about sequences x length / budget, whole sequences only
    assert packed_microbatches(sequences=128, budget=32768, sequence_tokens=4096) == 16
    assert packed_microbatches(sequences=128, budget=32768, sequence_tokens=5000) == 22  # 6 per row
    assert packed_microbatches(sequences=3, budget=32768, sequence_tokens=100) == 1
    # the interleaved schedule: a multiple of the pipeline size
    assert packed_microbatches(sequences=128, budget=32768, sequence_tokens=5000, pp=4, vpp=2) == 24
    with pytest.raises(ValueError, match="does not fit a budget"):
        packed_microbatches(sequences=1, budget=100, sequence_tokens=101)


@pytest.mark.parametrize("budget", [17407, 24000, 32768])
def test_packed_plan_sizes_a_row_of_the_padded_budget(budget):
    cfg = load("qwen2p5_32b")
    cfg.algorithm.max_tokens_per_microbatch = budget
    a = read_architecture(cfg)
    plan = make_plan(cfg, a)
    padded = -(-budget // 64) * 64  # 8 x TP 8
    assert (plan.micro_batch, plan.seq_len, plan.packed) == (1, padded, True)
    # the same as an unpacked plan of one sequence of the padded budget per micro-batch
    cfg.algorithm.max_tokens_per_microbatch, cfg.algorithm.micro_batch_size = None, 1
    cfg.rollout.max_model_len = padded
    unpacked = make_plan(cfg, a)
    assert plan.num_microbatches == unpacked.num_microbatches == 128  # 1024 sequences / 4 / DP 2
    for mine, theirs in zip(plan.stages, unpacked.stages):
        assert mine.activations == theirs.activations and mine.head == theirs.head
    head = head_buffer_bytes(tokens=padded, hidden=a.hidden_size, padded_vocab=padded_vocab_size(a.vocab_size, 8),
                             tp=8, sequence_parallel=True, logprob_impl="fused").peak
    assert plan.stages[-1].head == head


def test_in_flight_micro_batches_depend_on_the_pipeline_not_on_their_number():
    cfg = load("llama3p1_70b")  # PP 4
    a = read_architecture(cfg)
    worst = make_plan(cfg, a)
    short = make_plan(cfg, a, mean_sequence_tokens=2048)  # 16 per row: 8 micro-batches
    assert (worst.num_microbatches, short.num_microbatches) == (128, 8)
    assert worst.stages[0].activations == short.stages[0].activations
    few = make_plan(cfg, a, mean_sequence_tokens=16384)  # 2 per row
    assert few.num_microbatches == 64 and few.training_total == worst.training_total
    cfg.parallel.recompute = "none"
    b, layers = worst.seq_len, a.num_layers // 4
    assert make_plan(cfg, a).stages[0].activations["none"] == stage_activation_bytes(
        a, layers=layers, seq_len=b, micro_batch=1, tp=8, sequence_parallel=True, recompute="none",
        in_flight=pipeline_in_flight(4, None, 128), packed=True)


def test_packed_local_plan_counts_the_masks():
    cfg = load("deepseek_r1_distill_qwen_1p5b")
    a = read_architecture(cfg)
    te = make_plan(cfg, a)
    local = make_plan(cfg, a, impl=MEGATRON_LOCAL)
    b = cfg.algorithm.max_tokens_per_microbatch
    assert te.seq_len == local.seq_len == b
    kw = dict(layers=a.num_layers, seq_len=b, micro_batch=1, tp=1, sequence_parallel=False, in_flight=1,
              impl=MEGATRON_LOCAL)
    for mode in RECOMPUTE_MODES:
        assert local.stages[0].activations[mode] == stage_activation_bytes(a, recompute=mode, packed=True, **kw)
    # PP 1: one micro-batch in flight, so one mask for the stage instead of a causal mask per layer
    unpacked = stage_activation_bytes(a, recompute="none", **kw)
    assert local.stages[0].activations["none"] - unpacked == b * b - a.num_layers * b * b
    assert not local.fits and te.fits


def test_header_names_the_budget():
    cfg = load("llama3p1_70b")
    out = format_plan(make_plan(cfg, read_architecture(cfg)))
    assert "micro-batch 1 x 32768 tokens (packed), 128 micro-batches per optimizer step (if every sequence " \
           "is 17407 tokens)" in out
    cfg.algorithm.max_tokens_per_microbatch = None
    out = format_plan(make_plan(cfg, read_architecture(cfg)))
    assert "micro-batch 1 x 17408 tokens, 128 micro-batches per optimizer step, log-probs" in out


def test_a_budget_shorter_than_the_longest_sequence_is_refused():
    cfg = load("qwen2p5_32b")
    cfg.algorithm.max_tokens_per_microbatch = cfg.rollout.max_model_len - 2
    with pytest.raises(ConfigError, match="shorter than the longest sequence"):
        validate(cfg, 32)
    cfg.algorithm.max_tokens_per_microbatch = cfg.rollout.max_model_len - 1
    validate(cfg, 32)
