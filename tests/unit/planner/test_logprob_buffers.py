"""The planner's count of what the log-prob/entropy functions keep for backward equals the
bytes autograd actually keeps (measured with saved-tensor hooks)."""

from __future__ import annotations

import pytest
import torch

from megatron_cegppo.parallel.vocab_parallel import fused_vocab_parallel_logprobs_entropy, vocab_parallel_logprobs_entropy
from megatron_cegppo.planner.logprob import head_buffer_bytes, logprob_saved_bytes
from megatron_cegppo.testing.saved_tensors import SavedBytes

T, H, V = 96, 32, 200


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["logits", "fused"])
def test_saved_bytes_match_the_functions(impl, dtype):
    torch.manual_seed(0)
    hidden = torch.randn(T, H, dtype=dtype, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(V, H, dtype=dtype))
    labels = torch.randint(0, V, (T,))
    if impl == "logits":
        logits = (hidden @ weight.t()).detach().requires_grad_()
        meter = SavedBytes(exclude=[weight])
        with meter.record():
            lp, ent = vocab_parallel_logprobs_entropy(logits, labels, vocab_size=V - 8)
    else:
        meter = SavedBytes(exclude=[weight])
        with meter.record():
            lp, ent = fused_vocab_parallel_logprobs_entropy(hidden, weight, labels, vocab_size=V - 8)
    e = torch.finfo(dtype).bits // 8
    assert meter.total == logprob_saved_bytes(tokens=T, hidden=H, shard=V, logprob_impl=impl, dtype_bytes=e)
    (lp.sum() + ent.sum()).backward()  # the graph the bytes belong to is complete


def test_fused_keeps_no_vocabulary_sized_tensor():
    big = dict(tokens=16384, hidden=5120, padded_vocab=152064, tp=8, sequence_parallel=True)
    fused = head_buffer_bytes(logprob_impl="fused", **big)
    logits = head_buffer_bytes(logprob_impl="logits", **big)
    shard_logits = 2 * 16384 * 152064 // 8
    assert fused.saved < shard_logits / 2 and logits.saved > shard_logits
    assert fused.peak < logits.peak


def test_unknown_implementation_is_named():
    with pytest.raises(ValueError, match="fused or logits"):
        logprob_saved_bytes(tokens=1, hidden=1, shard=1, logprob_impl="dense")
