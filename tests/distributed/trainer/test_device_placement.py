"""The GPU failures a CPU run cannot show by itself, shown on the CPU with fake CUDA tensors
(``FakeTensorMode``: device checks without a GPU).

1. Every tensor of a micro-batch reaches the model's device: the trainer's micro-batches go
   through the platform's placement step, and megatron's embedding then takes them. Without
   the placement, the embedding raises the device mismatch a GPU run raised at its first
   forward.
2. The trainer's own collectives (the mini-batch loss normalizer, the stop agreement) get a
   tensor NCCL accepts, also in a world of one.
The loss itself validates its inputs' values (data-dependent checks no fake tensor can answer):
on a device it runs in the GPU checks (benchmarks/gpu_check.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_cegppo.testing.multiprocess import run_distributed

pytestmark = pytest.mark.distributed


def _worker(rank, world):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import VocabParallelEmbedding
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException, FakeTensorDeviceMismatchError, FakeTensorMode,
    )

    from megatron_cegppo.cpu_compat import apply_cpu_compat
    from megatron_cegppo.parallel.pipeline_loss import minibatch_loss_normalizer, positive_loss_normalizer
    from megatron_cegppo.platform import Platform
    from megatron_cegppo.rollout.batch import build_microbatches
    from megatron_cegppo.rollout.engine import Completion
    from megatron_cegppo.testing.collectives import CollectiveAudit, CollectiveDeviceError
    from megatron_cegppo.testing.tiny import tiny_gpt_config
    from megatron_cegppo.trainer.stop_requests import StopRequests

    apply_cpu_compat()
    parallel_state.initialize_model_parallel()
    cuda = torch.device("cuda", 0)
    gpu = Platform(device=cuda, backend="nccl", layer_impl="local", layer_reason="test", fused_softmax=False)
    vocab, seq = 32, 8
    prompts = {0: [1, 2, 3], 1: [4, 5]}
    completions = [Completion(0, [6, 7], [-0.5, -0.6]), Completion(1, [8, 9, 10], [-0.1, -0.2, -0.3])]
    advantages = torch.tensor([1.0, -1.0])
    embedding = VocabParallelEmbedding(vocab, 16, init_method=torch.nn.init.normal_, config=tiny_gpt_config())
    out = {}
    torch.set_grad_enabled(False)  # the CPU build cannot accumulate gradients into fake CUDA tensors
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        embedding._apply(lambda t: mode.from_tensor(t).to(cuda))
        kw = dict(pad_id=0, seq_len=seq, micro_batch_size=1)

        unplaced = build_microbatches(prompts, completions, advantages, place=lambda b: b, **kw)
        try:
            embedding(unplaced[0].input_ids)
            out["unplaced"] = "no error"
        except FakeTensorDeviceMismatchError as exc:
            out["unplaced"] = f"mismatch: {exc}"

        per_sequence = dict(positive=torch.tensor([True, False]), sequence_index=torch.tensor([0, 1]))
        micro = build_microbatches(prompts, completions, advantages, place=gpu.place, **per_sequence, **kw)
        packed = build_microbatches(prompts, completions, advantages, place=gpu.place, pad_id=0, seq_len=seq,
                                    packs=[[0, 1]], packed_tokens=16, **per_sequence)
        out["devices"] = sorted({str(t.device) for m in micro + packed for t in vars(m).values()
                                 if isinstance(t, torch.Tensor)})
        out["packed_fields"] = sorted(k for k, t in vars(packed[0]).items() if isinstance(t, torch.Tensor))
        out["embedding"] = str(embedding(micro[0].input_ids).device)
        out["embedding_packed"] = str(embedding(packed[0].input_ids).device)

        with CollectiveAudit({"cuda"}, emulate_single_rank=True) as audit:
            norm = minibatch_loss_normalizer([m.loss_mask for m in micro], "token-mean",
                                             parallel_state.get_data_parallel_group())
            out["normalizer"] = str(norm.device)
            positive = positive_loss_normalizer(micro, "token-mean", parallel_state.get_data_parallel_group())
            out["positive_normalizer"] = str(positive.device)
            stops = StopRequests(SimpleNamespace(platform=gpu, world=1, rank=0), run_dir="/nonexistent")
            stops.requested = True
            try:
                stops.agreed()
            except DataDependentOutputException:
                out["stop"] = "agreed"  # past its all-reduce; a fake flag has no value to read
            except CollectiveDeviceError as exc:
                out["stop"] = str(exc)
        out["collectives"] = audit.calls
        try:  # what the stop agreement did before: a CPU flag, refused by NCCL
            with CollectiveAudit({"cuda"}, emulate_single_rank=True):
                torch.distributed.all_reduce(torch.tensor(1.0))
            out["cpu_flag"] = "accepted"
        except CollectiveDeviceError as exc:
            out["cpu_flag"] = str(exc)
    return out


def test_microbatches_and_collectives_live_on_the_model_device():
    (out,) = run_distributed(_worker, 1, timeout=300)
    assert out["unplaced"].startswith("mismatch"), out["unplaced"]  # the check can fail
    assert out["devices"] == ["cuda:0"]
    assert {"attention_mask", "unpack_index", "input_ids", "loss_mask", "positive", "sequence_index"} <= set(
        out["packed_fields"])
    assert out["embedding_packed"] == "cuda:0"
    assert out["embedding"] == "cuda:0" and out["normalizer"] == "cuda:0" and out["positive_normalizer"] == "cuda:0"
    assert out["stop"] == "agreed", out["stop"]
    names = [name for name, _ in out["collectives"]]
    assert names == ["all_reduce"] * 3, names  # the normalizers (loss, positive NLL), the stop flag
    assert all(d == "cuda:0" for _, devices in out["collectives"] for d in devices), out["collectives"]
    assert "cpu" in out["cpu_flag"], out["cpu_flag"]
