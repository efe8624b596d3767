"""The planner's activation count is Korthikanti et al.'s published formula for the paper's
layer, at every parallel layout and recomputation mode the paper gives."""

from __future__ import annotations

import pytest

from megatron_cegppo.models.hf_config import HFArchitecture
from megatron_cegppo.planner import (
    MEGATRON_LOCAL,
    PAPER_GPT,
    TRANSFORMER_ENGINE,
    layer_activation_bytes,
    pipeline_in_flight,
    stage_activation_bytes,
)

S, B, H, A, L = 2048, 4, 1024, 16, 24  # divisible by every TP below


def paper_gpt(layers: int = L) -> HFArchitecture:
    # MHA (a query head per KV head), a 4h MLP (the GeLU switch in PAPER_GPT)
    return HFArchitecture(model_type="llama", vocab_size=51200, hidden_size=H, num_layers=layers, num_heads=A,
                          num_kv_heads=A, head_dim=H // A, ffn_hidden_size=4 * H, rms_norm_eps=1e-5,
                          rope_theta=1e4, max_position_embeddings=S, qkv_bias=False, tie_word_embeddings=False)


def per_layer(tp, sp, recompute="none"):
    return layer_activation_bytes(paper_gpt(), seq_len=S, micro_batch=B, tp=tp, sequence_parallel=sp,
                                  recompute=recompute, dtype_bytes=2, impl=PAPER_GPT).total


def test_no_parallelism_is_34sbh_plus_5as2b():
    assert per_layer(1, False) == S * B * H * 34 + 5 * A * S * S * B


@pytest.mark.parametrize("t", [2, 4, 8])
def test_tensor_parallel_without_sequence_parallel(t):
    # sbh (10 + 24/t + 5as/(ht)): norms, QKV and fc1 inputs and dropout masks stay replicated
    assert per_layer(t, False) * t == S * B * H * (10 * t + 24) + 5 * A * S * S * B


@pytest.mark.parametrize("t", [2, 4, 8])
def test_tensor_and_sequence_parallel(t):
    assert per_layer(t, True) * t == S * B * H * 34 + 5 * A * S * S * B


@pytest.mark.parametrize("t", [1, 4])
def test_selective_recomputation_drops_the_attention_scores(t):
    assert per_layer(t, True, "selective") * t == S * B * H * 34


@pytest.mark.parametrize("t", [1, 8])
def test_full_recomputation_keeps_each_layer_input(t):
    got = stage_activation_bytes(paper_gpt(), layers=L, seq_len=S, micro_batch=B, tp=t, sequence_parallel=True,
                                 recompute="full", in_flight=1, dtype_bytes=2, impl=PAPER_GPT)
    # 2sbhL/t, plus one layer's activations while it is recomputed in backward
    assert got == 2 * S * B * H * L // t + per_layer(t, True)


def test_pipeline_first_stage_holds_pp_microbatches():
    assert pipeline_in_flight(4, None, 16) == 4
    assert pipeline_in_flight(4, None, 16, stage=3) == 1
    assert pipeline_in_flight(4, None, 2) == 2  # fewer micro-batches than stages
    assert pipeline_in_flight(1, None, 8) == 1
    # interleaved: L(1 + (p - 1)/(p v)) layers' worth for the first stage (the paper, 4.2.3)
    assert pipeline_in_flight(4, 2, 16) == pytest.approx(4 * (1 + 3 / 8))


def test_first_stage_total_is_the_papers_L_layers_at_any_pp():
    arch = paper_gpt()
    whole = stage_activation_bytes(arch, layers=L, seq_len=S, micro_batch=B, tp=8, sequence_parallel=True,
                                   recompute="selective", in_flight=1, impl=PAPER_GPT)
    for pp in (2, 4, 8):
        stage0 = stage_activation_bytes(arch, layers=L // pp, seq_len=S, micro_batch=B, tp=8, sequence_parallel=True,
                                        recompute="selective", in_flight=pipeline_in_flight(pp, None, 64),
                                        impl=PAPER_GPT)
        assert stage0 == whole


def test_flash_attention_keeps_no_scores_and_grouped_kv_keeps_less():
    arch = paper_gpt()
    te = layer_activation_bytes(arch, seq_len=S, micro_batch=B, tp=1, impl=TRANSFORMER_ENGINE)
    assert te.attention_scores == 0
    gqa = HFArchitecture(**{**arch.__dict__, "num_kv_heads": 2})
    assert layer_activation_bytes(gqa, seq_len=S, micro_batch=B, impl=TRANSFORMER_ENGINE).total < te.total
    # unfused attention repeats K/V to all heads: grouping saves nothing there
    assert (layer_activation_bytes(gqa, seq_len=S, micro_batch=B, impl=MEGATRON_LOCAL).total
            == layer_activation_bytes(arch, seq_len=S, micro_batch=B, impl=MEGATRON_LOCAL).total)


def test_unknown_recompute_mode_is_named():
    with pytest.raises(ValueError, match="recompute must be one of"):
        layer_activation_bytes(paper_gpt(), seq_len=8, micro_batch=1, recompute="some")
