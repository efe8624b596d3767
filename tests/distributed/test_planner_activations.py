"""The planner's per-layer activation bytes equal what megatron-core's local layers keep for
backward, measured with saved-tensor hooks at several tensor-parallel layouts: the bytes of a
model of two layers minus those of one layer, same inputs."""

from __future__ import annotations

import pytest

from megatron_cegppo.testing.multiprocess import run_distributed

pytestmark = pytest.mark.distributed

SEQ, MBS = 32, 2
SHAPE = dict(hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96)


def worker(rank, world, tp, sp, recompute):
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.models.gpt import build_gpt_model_chunks
    from megatron_cegppo.models.hf_config import recompute_settings
    from megatron_cegppo.parallel.cpu_compat import apply_cpu_compat
    from megatron_cegppo.testing.saved_tensors import SavedBytes
    from megatron_cegppo.testing.tiny import tiny_gpt_config

    apply_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    saved = []
    for layers in (1, 2):
        model_parallel_cuda_manual_seed(0)
        config = tiny_gpt_config(tp=tp, sequence_parallel=sp, num_layers=layers, **SHAPE)
        for key, value in recompute_settings(recompute).items():
            setattr(config, key, value)
        model = build_gpt_model_chunks(config, vocab_size=256, max_sequence_length=SEQ)[0]
        ids = torch.randint(0, 256, (MBS, SEQ), generator=torch.Generator().manual_seed(0))
        meter = SavedBytes(exclude=list(model.parameters()))
        with meter.record():  # forward only: a recomputed forward in backward saves its own
            out = model(ids, torch.arange(SEQ).expand(MBS, SEQ), None)
        out.sum().backward()
        saved.append(meter.total)
    return saved[1] - saved[0]


def planned(tp, sp, recompute):
    from megatron_cegppo.models.hf_config import HFArchitecture
    from megatron_cegppo.planner import MEGATRON_LOCAL, layer_activation_bytes, stage_activation_bytes

    arch = HFArchitecture(model_type="qwen2", vocab_size=256, hidden_size=64, num_layers=1, num_heads=4,
                          num_kv_heads=2, head_dim=16, ffn_hidden_size=96, rms_norm_eps=1e-6, rope_theta=1e4,
                          max_position_embeddings=SEQ, qkv_bias=True, tie_word_embeddings=False)
    if recompute == "full":  # one layer's input per layer; the recomputed layer's own bytes are transient
        return stage_activation_bytes(arch, layers=1, seq_len=SEQ, micro_batch=MBS, tp=tp, sequence_parallel=sp,
                                      recompute="full", in_flight=1, dtype_bytes=4, impl=MEGATRON_LOCAL) - \
            layer_activation_bytes(arch, seq_len=SEQ, micro_batch=MBS, tp=tp, sequence_parallel=sp,
                                   dtype_bytes=4, impl=MEGATRON_LOCAL).total
    return layer_activation_bytes(arch, seq_len=SEQ, micro_batch=MBS, tp=tp, sequence_parallel=sp,
                                  recompute=recompute, dtype_bytes=4, impl=MEGATRON_LOCAL).total


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)])
def test_layer_activations_match_megatron(tp, sp):
    measured = run_distributed(worker, tp, tp, sp, "none", timeout=180)
    assert measured == [planned(tp, sp, "none")] * tp


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recomputed_layer_activations_match_megatron(recompute):
    measured = run_distributed(worker, 2, 2, True, recompute, timeout=180)
    assert measured == [planned(2, True, recompute)] * 2
