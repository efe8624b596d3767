"""The planner's per-layer activation bytes equal what megatron-core's local layers keep for
backward, measured with saved-tensor hooks at several tensor-parallel layouts: the bytes of a
model of two layers minus those of one layer, same inputs. Packed, the micro-batch is one row
of SEQ x MBS tokens with the trainer's block-diagonal mask as the attention mask, which both
models keep once (whole, on every rank)."""

from __future__ import annotations

import pytest

from megatron_cegppo.testing.multiprocess import run_distributed

pytestmark = pytest.mark.distributed

SEQ, MBS = 32, 2
SHAPE = dict(hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96)


PACKED = SEQ * MBS
LENGTHS = (30, 21)  # two sequences, then padding tokens, each a block of its own


def block_diagonal_mask():
    import torch

    segment = torch.empty(PACKED, dtype=torch.long)
    offset = 0
    for i, n in enumerate(LENGTHS):
        segment[offset:offset + n] = i
        offset += n
    segment[offset:] = torch.arange(len(LENGTHS), len(LENGTHS) + PACKED - offset)
    causal = torch.ones(PACKED, PACKED, dtype=torch.bool).tril()
    return ~((segment[:, None] == segment[None, :]) & causal)[None, None]


def worker(rank, world, tp, sp, recompute, packed=False):
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.models.gpt import build_gpt_model_chunks
    from megatron_cegppo.models.hf_config import recompute_settings
    from megatron_cegppo.cpu_compat import apply_cpu_compat
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
        rows, tokens = (1, PACKED) if packed else (MBS, SEQ)
        model = build_gpt_model_chunks(config, vocab_size=256, max_sequence_length=tokens)[0]
        ids = torch.randint(0, 256, (rows, tokens), generator=torch.Generator().manual_seed(0))
        if packed:
            mask = block_diagonal_mask()
            positions = torch.cat([torch.arange(n) for n in LENGTHS] + [torch.arange(PACKED - sum(LENGTHS))])[None]
        else:
            mask, positions = None, torch.arange(SEQ).expand(MBS, SEQ)
        meter = SavedBytes(exclude=list(model.parameters()))
        with meter.record():  # forward only: a recomputed forward in backward saves its own
            out = model(ids, positions, mask)
        out.sum().backward()
        saved.append(meter.total)
        if packed:  # the mask is kept once, whole, whatever the number of layers
            saved.append(meter._seen.get(mask.untyped_storage().data_ptr(), 0))
    if packed:
        return saved[2] - saved[0], saved[1], saved[3]
    return saved[1] - saved[0]


def planned(tp, sp, recompute, packed=False):
    from megatron_cegppo.models.hf_config import HFArchitecture
    from megatron_cegppo.planner import MEGATRON_LOCAL, layer_activation_bytes, packed_mask_bytes, stage_activation_bytes

    seq, mbs = (PACKED, 1) if packed else (SEQ, MBS)
    arch = HFArchitecture(model_type="qwen2", vocab_size=256, hidden_size=64, num_layers=1, num_heads=4,
                          num_kv_heads=2, head_dim=16, ffn_hidden_size=96, rms_norm_eps=1e-6, rope_theta=1e4,
                          max_position_embeddings=seq, qkv_bias=True, tie_word_embeddings=False)
    kw = dict(seq_len=seq, micro_batch=mbs, tp=tp, sequence_parallel=sp, dtype_bytes=4, impl=MEGATRON_LOCAL,
              packed=packed)
    if recompute == "full":  # one layer's input per layer; the recomputed layer's own bytes are transient
        layer = stage_activation_bytes(arch, layers=1, recompute="full", in_flight=1, **kw) - \
            layer_activation_bytes(arch, **kw).total - (packed_mask_bytes(seq, MEGATRON_LOCAL) if packed else 0)
    else:
        layer = layer_activation_bytes(arch, recompute=recompute, **kw).total
    if packed:  # the micro-batch's mask, outside the layers
        return layer, packed_mask_bytes(seq, MEGATRON_LOCAL), packed_mask_bytes(seq, MEGATRON_LOCAL)
    return layer


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)])
def test_layer_activations_match_megatron(tp, sp):
    measured = run_distributed(worker, tp, tp, sp, "none", timeout=180)
    assert measured == [planned(tp, sp, "none")] * tp


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recomputed_layer_activations_match_megatron(recompute):
    measured = run_distributed(worker, 2, 2, True, recompute, timeout=180)
    assert measured == [planned(2, True, recompute)] * 2


@pytest.mark.parametrize("tp,sp,recompute", [(1, False, "none"), (2, True, "none"), (2, True, "selective"),
                                             (2, True, "full")])
def test_packed_layer_activations_and_mask_match_megatron(tp, sp, recompute):
    measured = run_distributed(worker, tp, tp, sp, recompute, True, timeout=180)
    assert [tuple(m) for m in measured] == [planned(tp, sp, recompute, packed=True)] * tp
