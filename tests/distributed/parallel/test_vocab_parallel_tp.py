"""Vocab-parallel log-probs and entropy across real tensor-parallel processes (gloo), compared
with the single-process dense computation (log_softmax over the full vocabulary)."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.distributed as dist

from megatron_cegppo.parallel import (
    fused_vocab_parallel_logprobs_entropy,
    vocab_parallel_logprobs_entropy,
)
from megatron_cegppo.testing.multiprocess import run_distributed

pytestmark = pytest.mark.distributed

HIDDEN = 24


def make_case(name, padded_vocab, vocab_size, tp, dtype, scale=3.0, temperature=1.0, tokens=(3, 11)):
    """Deterministic full-vocabulary inputs; labels include every shard boundary."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    hidden = torch.randn(*tokens, HIDDEN, generator=g)
    weight = torch.randn(padded_vocab, HIDDEN, generator=g) * (scale / HIDDEN**0.5)
    weight[vocab_size:] = 0.0  # padded rows of an HF-imported output layer are zeros
    logits = torch.randn(*tokens, padded_vocab, generator=g) * scale
    labels = torch.randint(0, vocab_size, tokens, generator=g)
    width = padded_vocab // tp
    boundary = sorted({i for r in range(1, tp) for i in (r * width - 1, r * width) if i < vocab_size}
                      | {0, vocab_size - 1})
    flat = labels.view(-1)
    flat[: len(boundary)] = torch.tensor(boundary)
    upstream = torch.randn(2, *tokens, generator=g)
    return dict(name=name, hidden=hidden.to(dtype), weight=weight.to(dtype), logits=logits.to(dtype),
                labels=labels, vocab_size=vocab_size, temperature=temperature, upstream=upstream)


def cases(tp):
    return [
        make_case("fp32", 64, 64, tp, torch.float32),
        make_case("padded", 128, 90, tp, torch.float32),  # at TP=4 the last shard is all padding
        make_case("huge", 64, 61, tp, torch.float32, scale=1e4),
        make_case("temperature", 64, 64, tp, torch.float32, temperature=0.6),
        make_case("bf16", 128, 100, tp, torch.bfloat16),
    ]


def _shard(t, rank, tp):
    width = t.shape[0] // tp if t.dim() == 2 else t.shape[-1] // tp
    if t.dim() == 2:  # weight [V, H]
        return t[rank * width:(rank + 1) * width].clone()
    return t[..., rank * width:(rank + 1) * width].clone()


def worker(rank, world, chunk_size):
    group = dist.group.WORLD
    out = {}
    for case in cases(world):
        kw = dict(tp_group=group, temperature=case["temperature"], vocab_size=case["vocab_size"],
                  chunk_size=chunk_size)
        w_lp, w_ent = case["upstream"]
        logits = _shard(case["logits"], rank, world).requires_grad_()
        before = logits.detach().clone()
        lp, ent = vocab_parallel_logprobs_entropy(logits, case["labels"], **kw)
        (lp * w_lp + ent * w_ent).sum().backward()
        assert torch.equal(logits.detach(), before), "input logits were modified"
        hidden = case["hidden"].clone().requires_grad_()
        weight = _shard(case["weight"], rank, world).requires_grad_()
        flp, fent = fused_vocab_parallel_logprobs_entropy(hidden, weight, case["labels"], **kw)
        (flp * w_lp + fent * w_ent).sum().backward()
        out[case["name"]] = dict(lp=lp.detach(), ent=ent.detach(), grad=logits.grad,
                                 flp=flp.detach(), fent=fent.detach(),
                                 fgrad_h=hidden.grad, fgrad_w=weight.grad)
    return out


def dense_reference(case, logits):
    """Single-process reference on the full vocabulary, float64."""
    x = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(x[..., : case["vocab_size"]] / case["temperature"], dim=-1)
    lp = logp.gather(-1, case["labels"].unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    w_lp, w_ent = case["upstream"]
    (lp * w_lp.double() + ent * w_ent.double()).sum().backward()
    return lp.detach(), ent.detach(), x.grad


def dense_fused_reference(case):
    h = case["hidden"].detach().double().requires_grad_()
    w = case["weight"].detach().double().requires_grad_()
    x = h @ w.t()
    logp = torch.log_softmax(x[..., : case["vocab_size"]] / case["temperature"], dim=-1)
    lp = logp.gather(-1, case["labels"].unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    w_lp, w_ent = case["upstream"]
    (lp * w_lp.double() + ent * w_ent.double()).sum().backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def _close(actual, expected, atol, rtol, what):
    actual = actual.double()
    err = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"{what}: max abs error {err:.3g}"


def _close_norm(actual, expected, rel, what):
    """For bf16 results: error relative to the tensor's norm (bf16 keeps ~3 digits)."""
    err = ((actual.double() - expected).norm() / expected.norm()).item()
    assert err < rel, f"{what}: relative error {err:.3g} >= {rel}"


@pytest.mark.parametrize("tp,chunk_size", [(2, 4), (4, None)])
def test_matches_dense_full_vocabulary(tp, chunk_size):
    results = run_distributed(worker, tp, chunk_size, timeout=300)
    for case in cases(tp):
        name, bf16 = case["name"], case["logits"].dtype == torch.bfloat16
        per_rank = [r[name] for r in results]
        lp, ent, grad = dense_reference(case, case["logits"].float())
        # The logits path works in fp32 on the given values: tight even for bf16 inputs,
        # except the returned bf16 gradient (one rounding). At |logits| ~ 1e4 the fp32
        # spacing is ~1e-3, which bounds what any fp32 implementation can reach.
        resolution = 4 * torch.finfo(torch.float32).eps * case["logits"].abs().max().item()
        tol = 1e-5 + resolution
        for r, res in enumerate(per_rank):
            _close(res["lp"], lp, tol, 1e-5, f"{name} log-probs rank {r}")
            _close(res["ent"], ent, tol, 1e-5, f"{name} entropy rank {r}")
        full_grad = torch.cat([res["grad"] for res in per_rank], dim=-1)
        assert full_grad.dtype == case["logits"].dtype
        _close(full_grad, grad, 1e-2 if bf16 else 1e-6 + resolution, 1e-2 if bf16 else 1e-5, f"{name} logits grad")
        assert torch.all(full_grad[..., case["vocab_size"]:] == 0), f"{name}: padded columns got gradient"

        flp, fent, fgh, fgw = dense_fused_reference(case)
        full_w = torch.cat([res["fgrad_w"] for res in per_rank], dim=0)
        assert torch.all(full_w[case["vocab_size"]:] == 0), f"{name}: padded weight rows got gradient"
        if bf16:
            # The chunk's logits are a bf16 matmul, as megatron's bf16 output layer gives.
            close = lambda a, b, what: _close_norm(a, b, 2e-2, what)  # noqa: E731
        else:
            close = lambda a, b, what: _close(a, b, 2e-5 + resolution, 1e-4, what)  # noqa: E731
        for r, res in enumerate(per_rank):
            close(res["flp"], flp, f"{name} fused log-probs rank {r}")
            close(res["fent"], fent, f"{name} fused entropy rank {r}")
            close(res["fgrad_h"], fgh, f"{name} fused hidden grad rank {r}")
        close(full_w, fgw, f"{name} fused weight grad")
