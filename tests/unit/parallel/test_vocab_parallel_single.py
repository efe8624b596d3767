"""Single-shard behaviour of the vocab-parallel log-prob/entropy functions: values and
gradients against dense autograd, padding, chunking, what is saved for backward, bad input."""

from __future__ import annotations

import pytest
import torch

from megatron_cegppo.parallel import (
    fused_vocab_parallel_logprobs_entropy,
    vocab_parallel_logprobs_entropy,
)


def dense(logits, labels, vocab_size, temperature=1.0):
    logp = torch.log_softmax(logits[..., :vocab_size].double() / temperature, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, None])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.7])
def test_values_and_gradients_match_dense_autograd(chunk_size, temperature):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 5, 40, generator=g) * 4).requires_grad_()
    labels = torch.randint(0, 33, (4, 5), generator=g)
    w = torch.randn(2, 4, 5, generator=g)
    lp, ent = vocab_parallel_logprobs_entropy(logits, labels, vocab_size=33, temperature=temperature,
                                              chunk_size=chunk_size)
    (lp * w[0] + ent * w[1]).sum().backward()
    ref_in = logits.detach().double().requires_grad_()
    rlp, rent = dense(ref_in, labels, 33, temperature)
    (rlp * w[0] + rent * w[1]).sum().backward()
    torch.testing.assert_close(lp.double(), rlp, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(ent.double(), rent, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(logits.grad.double(), ref_in.grad, atol=2e-6, rtol=1e-5)
    assert torch.all(logits.grad[..., 33:] == 0)


def test_entropy_alone_is_differentiable():
    logits = torch.randn(6, 20, requires_grad=True)
    _, ent = vocab_parallel_logprobs_entropy(logits, torch.zeros(6, dtype=torch.long))
    ent.sum().backward()
    ref = logits.detach().double().requires_grad_()
    dense(ref, torch.zeros(6, dtype=torch.long), 20)[1].sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref.grad, atol=1e-6, rtol=1e-5)


def test_input_is_not_modified_and_large_logits_are_stable():
    logits = torch.randn(8, 30) * 1e4
    logits[:, 7] = 1e5  # one dominant token per row
    before = logits.clone()
    lp, ent = vocab_parallel_logprobs_entropy(logits, torch.full((8,), 7))
    assert torch.equal(logits, before)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(lp, torch.zeros(8), atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, torch.zeros(8), atol=1e-6, rtol=0)


def test_fused_equals_logits_path_and_saves_no_vocab_sized_tensor():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 45, (3, 7), generator=g)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        flp, fent = fused_vocab_parallel_logprobs_entropy(hidden, weight, labels, vocab_size=45, chunk_size=4)
    assert not any(50 in shape and len(shape) > 1 and shape != (50, 16) for shape in saved), saved
    (flp + 0.3 * fent).sum().backward()
    h2 = hidden.detach().clone().requires_grad_()
    w2 = weight.detach().clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs_entropy(h2 @ w2.t(), labels, vocab_size=45)
    (lp + 0.3 * ent).sum().backward()
    torch.testing.assert_close(flp, lp, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(fent, ent, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(hidden.grad, h2.grad, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(weight.grad, w2.grad, atol=2e-6, rtol=1e-5)
    assert torch.all(weight.grad[45:] == 0)


def test_logits_path_saves_only_its_input_and_token_vectors():
    logits = torch.randn(12, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        vocab_parallel_logprobs_entropy(logits, torch.zeros(12, dtype=torch.long))
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr(), [tuple(t.shape) for t in saved]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(labels=torch.tensor([[0, 99]])), "outside the vocabulary"),
        (dict(labels=torch.tensor([[0, -1]])), "outside the vocabulary"),
        (dict(labels=torch.tensor([[0.0, 1.0]])), "integer token ids"),
        (dict(labels=torch.tensor([0, 1])), "labels shape"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(vocab_size=11), "vocab_size=11"),
        (dict(vocab_size=0), "vocab_size=0"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    args = dict(logits=torch.randn(1, 2, 10), labels=torch.tensor([[0, 1]]))
    args.update(kwargs)
    logits, labels = args.pop("logits"), args.pop("labels")
    with pytest.raises(ValueError, match=match):
        vocab_parallel_logprobs_entropy(logits, labels, **args)


def test_label_in_padding_is_rejected():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab_parallel_logprobs_entropy(torch.randn(2, 16), torch.tensor([3, 14]), vocab_size=12)


def test_fused_bad_weight_is_named():
    with pytest.raises(ValueError, match="weight must be"):
        fused_vocab_parallel_logprobs_entropy(torch.randn(2, 8), torch.randn(10, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="dtypes differ"):
        fused_vocab_parallel_logprobs_entropy(torch.randn(2, 8), torch.randn(10, 8).bfloat16(),
                                              torch.tensor([0, 1]))
