"""Aggregation modes against plain per-sequence loops, and the micro-batch normalizer."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_cegppo.losses import (
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    aggregate_loss,
    loss_normalizer,
)

SETTINGS = settings(max_examples=60, deadline=None)


def reference_aggregate(loss, mask, mode):
    """Each mode's definition, written as loops over Python floats."""
    rows = loss.tolist()
    mrows = mask.tolist()
    batch, length = len(rows), len(rows[0])
    seq_sums, seq_counts = [], []
    for vals, ms in zip(rows, mrows):
        s, n = 0.0, 0
        for v, m in zip(vals, ms):
            if m:
                s += v
                n += 1
        seq_sums.append(s)
        seq_counts.append(n)
    total = sum(seq_sums)
    n_tok = sum(seq_counts)
    n_seq = sum(1 for n in seq_counts if n > 0)
    if mode == "token-mean":
        return total / n_tok if n_tok else 0.0
    if mode == "seq-mean-token-sum":
        return total / n_seq if n_seq else 0.0
    if mode == "seq-mean-token-mean":
        per_seq = [s / n for s, n in zip(seq_sums, seq_counts) if n > 0]
        return sum(per_seq) / n_seq if n_seq else 0.0
    if mode == "seq-mean-token-sum-norm":
        return total / (batch * length)
    raise AssertionError(mode)


@st.composite
def loss_and_mask(draw, min_batch=1):
    batch = draw(st.integers(min_batch, 6))
    length = draw(st.integers(1, 7))
    vals = draw(
        st.lists(st.floats(-5, 5, allow_nan=False), min_size=batch * length, max_size=batch * length)
    )
    bits = draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length))
    empty_rows = draw(st.lists(st.booleans(), min_size=batch, max_size=batch))
    loss = torch.tensor(vals, dtype=torch.float64).reshape(batch, length)
    mask = torch.tensor(bits).reshape(batch, length)
    mask[torch.tensor(empty_rows)] = False  # all-masked rows
    return loss, mask


@SETTINGS
@given(data=loss_and_mask(), mode=st.sampled_from(LOSS_AGG_MODES))
def test_modes_match_definition(data, mode):
    loss, mask = data
    got = aggregate_loss(loss, mask, mode)
    assert got.dim() == 0
    assert got.dtype == torch.float64
    assert math.isclose(got.item(), reference_aggregate(loss, mask, mode), rel_tol=1e-12, abs_tol=1e-12)


@SETTINGS
@given(data=loss_and_mask(), mode=st.sampled_from(LOSS_AGG_MODES))
def test_gradient_matches_definition(data, mode):
    """d loss / d loss_mat: 1/den on valid tokens (1/(n_i * n_seq) for seq-mean-token-mean), else 0."""
    loss, mask = data
    loss = loss.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(aggregate_loss(loss, mask, mode), loss)
    batch, length = mask.shape
    counts = mask.sum(-1).tolist()
    n_tok = sum(counts)
    n_seq = sum(1 for c in counts if c)
    for i in range(batch):
        for t in range(length):
            if not mask[i, t]:
                expect = 0.0
            elif mode == "token-mean":
                expect = 1.0 / n_tok
            elif mode == "seq-mean-token-sum":
                expect = 1.0 / n_seq
            elif mode == "seq-mean-token-mean":
                expect = 1.0 / (counts[i] * n_seq)
            else:
                expect = 1.0 / (batch * length)
            assert math.isclose(grad[i, t].item(), expect, rel_tol=1e-12)


@SETTINGS
@given(data=loss_and_mask(min_batch=2), mode=st.sampled_from(LOSS_AGG_MODES), cuts=st.lists(st.integers(1, 5), max_size=3))
def test_micro_batches_with_full_normalizer_sum_to_full_loss(data, mode, cuts):
    loss, mask = data
    batch = mask.shape[0]
    bounds = sorted({c for c in cuts if c < batch})
    edges = [0, *bounds, batch]
    full = aggregate_loss(loss, mask, mode)
    norm = loss_normalizer(mask, mode)
    parts = [
        aggregate_loss(loss[a:b], mask[a:b], mode, normalizer=norm) for a, b in zip(edges, edges[1:])
    ]
    assert math.isclose(sum(p.item() for p in parts), full.item(), rel_tol=1e-12, abs_tol=1e-12)
    # Raw counts summed over micro-batches (as an all-reduce would) then clamped: same denominator.
    raw = sum(loss_normalizer(mask[a:b], mode, clamp=False) for a, b in zip(edges, edges[1:]))
    if mode == "seq-mean-token-sum-norm":
        # B*L is additive over row splits too.
        assert raw.item() == batch * mask.shape[1]
    assert raw.clamp(min=1).item() == norm.item()


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_policy_loss_micro_batches_sum_to_full_batch(name, mode):
    """Loss value and gradient of a mini-batch equal the sum over its micro-batches."""
    g = torch.Generator().manual_seed(3)
    batch, length = 6, 9
    lp0 = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3
    old = lp0 + 0.5 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    adv = torch.randn(batch, 1, generator=g, dtype=torch.float64).expand(batch, length).contiguous()
    mask = torch.rand(batch, length, generator=g) > 0.3
    mask[2] = False
    fn = POLICY_LOSSES[name]
    lp = lp0.clone().requires_grad_(True)
    full, _ = fn(lp, old, adv, mask, loss_agg_mode=mode)
    (g_full,) = torch.autograd.grad(full, lp)

    norm = loss_normalizer(mask, mode)
    lp = lp0.clone().requires_grad_(True)
    total = 0.0
    for a, b in ((0, 1), (1, 4), (4, 6)):
        part, _ = fn(lp[a:b], old[a:b], adv[a:b], mask[a:b], loss_agg_mode=mode, normalizer=norm)
        total = total + part
    (g_parts,) = torch.autograd.grad(total, lp)
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_parts, g_full, rtol=1e-12, atol=1e-12)


def test_normalizer_values():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.float32)
    assert loss_normalizer(mask, "token-mean").item() == 3
    assert loss_normalizer(mask, "seq-mean-token-sum").item() == 2
    assert loss_normalizer(mask, "seq-mean-token-mean").item() == 2
    assert loss_normalizer(mask, "seq-mean-token-sum-norm").item() == 9
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert loss_normalizer(empty, "token-mean").item() == 1
    assert loss_normalizer(empty, "token-mean", clamp=False).item() == 0
    assert loss_normalizer(empty, "seq-mean-token-mean", clamp=False).item() == 0


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_normalizer_override_number_and_tensor(mode):
    loss = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    num = aggregate_loss(loss, mask, mode) * loss_normalizer(mask, mode, dtype=torch.float64)
    for norm in (7, 2.5, torch.tensor(2.5), torch.tensor([4.0])):
        got = aggregate_loss(loss, mask, mode, normalizer=norm)
        assert math.isclose(got.item(), num.item() / float(norm), rel_tol=1e-12)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_all_masked_gives_zero_with_graph(mode):
    loss = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(3, 4)
    out = aggregate_loss(loss, mask, mode)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(loss.grad, torch.zeros_like(loss))


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_nonfinite_at_masked_positions_is_ignored(mode):
    base = torch.tensor([[1.0, float("nan")], [float("inf"), 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 0], [0, 1]], dtype=torch.int64)
    loss = base.clone().requires_grad_(True)
    out = aggregate_loss(loss, mask, mode)
    assert math.isclose(out.item(), reference_aggregate(torch.nan_to_num(base, 0.0, 0.0), mask.bool(), mode))
    out.backward()
    assert torch.isfinite(loss.grad).all()
    assert loss.grad[0, 1] == 0 and loss.grad[1, 0] == 0


def test_low_precision_loss_is_upcast():
    loss = torch.full((2, 3), 1.0 / 3.0, dtype=torch.bfloat16)
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = aggregate_loss(loss, mask, "token-mean")
    assert out.dtype == torch.float32
    assert math.isclose(out.item(), float(loss[0, 0]), rel_tol=1e-6)


def test_unknown_mode_and_bad_normalizer():
    loss = torch.zeros(2, 2)
    mask = torch.ones(2, 2)
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'mean'.*token-mean"):
        aggregate_loss(loss, mask, "mean")
    with pytest.raises(ValueError, match="unknown loss_agg_mode"):
        loss_normalizer(mask, "sum")
    with pytest.raises(ValueError, match="normalizer must be a finite number > 0"):
        aggregate_loss(loss, mask, "token-mean", normalizer=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        aggregate_loss(loss, torch.ones(2, 3), "token-mean")
