"""PPO/GRPO/DAPO, CISPO and GSPO baselines against references written in the test."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_cegppo.losses import (
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    cegppo_loss,
    cispo_loss,
    gspo_loss,
    ppo_clip_loss,
)

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def batches(draw, seq_constant_adv=False, max_delta=2.0):
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 6))
    n = batch * length
    lp = draw(st.lists(st.floats(-6.0, -0.01), min_size=n, max_size=n))
    delta = draw(st.lists(st.floats(-max_delta, max_delta), min_size=n, max_size=n))
    if seq_constant_adv:
        per_seq = draw(st.lists(st.one_of(st.floats(-3.0, 3.0), st.just(0.0)), min_size=batch, max_size=batch))
        adv = [a for a in per_seq for _ in range(length)]
    else:
        adv = draw(st.lists(st.one_of(st.floats(-3.0, 3.0), st.just(0.0)), min_size=n, max_size=n))
    bits = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    t = lambda v: torch.tensor(v, dtype=torch.float64).reshape(batch, length)  # noqa: E731
    lp_t = t(lp)
    return lp_t, lp_t - t(delta), t(adv), torch.tensor(bits).reshape(batch, length)


def grad_of(fn, lp0, old, adv, mask, **kw):
    lp = lp0.clone().requires_grad_(True)
    loss, metrics = fn(lp, old, adv, mask, **kw)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss, grad, metrics


eps_values = st.sampled_from([0.0, 0.1, 0.2, 0.28])


# --------------------------------------------------------------------------------- PPO


def textbook_ppo_tokens(lp, old, adv, eps_low, eps_high, c):
    r = torch.exp(lp - old)
    loss = torch.maximum(-adv * r, -adv * torch.clamp(r, 1 - eps_low, 1 + eps_high))
    if c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * c), loss)
    return loss


def reference_token_mean(loss, mask):
    n = int(mask.sum())
    return torch.where(mask, loss, 0.0).sum() / max(n, 1)


@SETTINGS
@given(
    data=batches(max_delta=3.0), eps_low=eps_values, eps_high=eps_values,
    c=st.sampled_from([None, 1.5, 3.0, 10.0]),
)
def test_ppo_equals_textbook(data, eps_low, eps_high, c):
    lp0, old, adv, mask = data
    loss, grad, m = grad_of(ppo_clip_loss, lp0, old, adv, mask, eps_low=eps_low, eps_high=eps_high, clip_ratio_c=c)
    lp = lp0.clone().requires_grad_(True)
    ref = reference_token_mean(textbook_ppo_tokens(lp, old, adv, eps_low, eps_high, c), mask)
    (ref_grad,) = torch.autograd.grad(ref, lp)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    # clip fractions by hand
    n = max(int(mask.sum()), 1)
    r = torch.exp(lp0 - old)
    low = int(((adv < 0) & (r < 1 - eps_low) & mask).sum())
    high = int(((adv > 0) & (r > 1 + eps_high) & mask).sum())
    assert math.isclose(m["clipfrac_low"].item(), low / n, rel_tol=1e-6)
    assert math.isclose(m["clipfrac_high"].item(), high / n, rel_tol=1e-6)
    assert ("dualclip_frac" in m) == (c is not None)


@SETTINGS
@given(data=batches(max_delta=3.0), eps_low=eps_values, eps_high=eps_values, c=st.sampled_from([1.5, 3.0, 10.0]))
def test_ppo_gradient_equals_cegppo_with_zero_beta(data, eps_low, eps_high, c):
    lp0, old, adv, mask = data
    kw = dict(eps_low=eps_low, eps_high=eps_high, clip_ratio_c=c)
    _, g_ppo, m_ppo = grad_of(ppo_clip_loss, lp0, old, adv, mask, **kw)
    _, g_ce, m_ce = grad_of(cegppo_loss, lp0, old, adv, mask, beta1=0.0, beta2=0.0, **kw)
    torch.testing.assert_close(g_ppo, g_ce, rtol=1e-12, atol=1e-12)
    for key in ("clipfrac_low", "clipfrac_high", "clipfrac"):
        assert m_ppo[key] == m_ce[key]


def test_dapo_clip_higher_is_asymmetric():
    # r = 1.25 with A > 0: clipped (no gradient) for eps_high = 0.2, kept for 0.28;
    # r = 0.75 with A < 0: clipped for eps_low = 0.2 regardless of eps_high.
    lp0 = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    old = lp0 - torch.log(torch.tensor([[1.25, 0.75]], dtype=torch.float64))
    adv = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    _, g_sym, m_sym = grad_of(ppo_clip_loss, lp0, old, adv, mask, eps_low=0.2, eps_high=0.2, normalizer=1)
    loss, g_dapo, m_dapo = grad_of(ppo_clip_loss, lp0, old, adv, mask, eps_low=0.2, eps_high=0.28, normalizer=1)
    torch.testing.assert_close(g_sym, torch.zeros(1, 2, dtype=torch.float64))
    torch.testing.assert_close(g_dapo, torch.tensor([[-2.0 * 1.25, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(loss, torch.tensor(-2.0 * 1.25 + 1.0 * 0.8, dtype=torch.float64))
    assert m_sym["clipfrac_high"].item() == 0.5 and m_dapo["clipfrac_high"].item() == 0.0
    assert m_sym["clipfrac_low"].item() == 0.5 and m_dapo["clipfrac_low"].item() == 0.5


def test_ppo_without_dual_clip_is_unbounded_for_negative_advantage():
    lp0 = torch.tensor([[-1.0]], dtype=torch.float64)
    old = lp0 - 3.0  # r = e^3
    adv = torch.tensor([[-1.0]], dtype=torch.float64)
    mask = torch.ones(1, 1)
    loss, grad, _ = grad_of(ppo_clip_loss, lp0, old, adv, mask)
    torch.testing.assert_close(loss, torch.tensor(math.exp(3.0), dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([[math.exp(3.0)]], dtype=torch.float64))
    loss_c, grad_c, m = grad_of(ppo_clip_loss, lp0, old, adv, mask, clip_ratio_c=3.0)
    torch.testing.assert_close(loss_c, torch.tensor(3.0, dtype=torch.float64))
    assert grad_c.item() == 0.0 and m["dualclip_frac"].item() == 1.0


# ------------------------------------------------------------------------------- CISPO


@SETTINGS
@given(
    data=batches(max_delta=3.0),
    eps_low=st.sampled_from([None, 0.2, 0.5]),
    eps_high=st.sampled_from([0.28, 1.0, 4.0]),
)
def test_cispo_gradient_is_clipped_detached_weight(data, eps_low, eps_high):
    lp0, old, adv, mask = data
    loss, grad, m = grad_of(cispo_loss, lp0, old, adv, mask, eps_low=eps_low, eps_high=eps_high, normalizer=1)
    total = 0.0
    truncated = 0
    for i in range(lp0.shape[0]):
        for t in range(lp0.shape[1]):
            if not mask[i, t]:
                assert grad[i, t].item() == 0.0
                continue
            x, a = lp0[i, t].item(), adv[i, t].item()
            r = math.exp(x - old[i, t].item())
            w = min(r, 1 + eps_high)
            if eps_low is not None:
                w = max(w, 1 - eps_low)
            truncated += (r > 1 + eps_high) or (eps_low is not None and r < 1 - eps_low)
            # descent on the loss == ascent on w * A * log pi: d loss / d lp = -w A
            assert math.isclose(grad[i, t].item(), -w * a, rel_tol=1e-12, abs_tol=1e-12)
            total += -w * a * x
    assert math.isclose(loss.item(), total, rel_tol=1e-12, abs_tol=1e-12)
    n = max(int(mask.sum()), 1)
    assert math.isclose(m["clipfrac"].item(), truncated / n, rel_tol=1e-6)


def test_cispo_keeps_every_token_and_has_no_default_lower_bound():
    lp0 = torch.tensor([[-1.0, -1.0, -1.0]], dtype=torch.float64)
    ratio = torch.tensor([[0.01, 1.0, 50.0]], dtype=torch.float64)
    old = lp0 - torch.log(ratio)
    adv = torch.tensor([[-1.0, 1.0, 1.0]], dtype=torch.float64)
    _, grad, m = grad_of(cispo_loss, lp0, old, adv, torch.ones(1, 3), normalizer=1)
    torch.testing.assert_close(grad, torch.tensor([[0.01, -1.0, -1.28]], dtype=torch.float64))
    assert m["clipfrac_low"].item() == 0.0
    assert math.isclose(m["clipfrac_high"].item(), 1 / 3, rel_tol=1e-6)


# -------------------------------------------------------------------------------- GSPO


def reference_gspo(lp, old, adv, mask, eps_low, eps_high):
    """Sequence-level GSPO with seq-mean-token-mean, by loops: (loss, grad, seq ratios)."""
    batch, length = lp.shape
    grad = [[0.0] * length for _ in range(batch)]
    seq_terms, ratios = [], []
    for i in range(batch):
        idx = [t for t in range(length) if mask[i, t]]
        if not idx:
            continue
        mean_lr = sum(lp[i, t].item() - old[i, t].item() for t in idx) / len(idx)
        s = math.exp(mean_lr)
        ratios.append(s)
        acc = 0.0
        for t in idx:
            a = adv[i, t].item()
            if a < 0 and s < 1 - eps_low:
                val, g = -a * (1 - eps_low), 0.0
            elif a > 0 and s > 1 + eps_high:
                val, g = -a * (1 + eps_high), 0.0
            else:
                val, g = -a * s, -a * s
            acc += val
            grad[i][t] = g / len(idx)
        seq_terms.append(acc / len(idx))
    n_seq = max(len(seq_terms), 1)
    grad = torch.tensor(grad, dtype=torch.float64) / n_seq
    return sum(seq_terms) / n_seq, grad, ratios


@SETTINGS
@given(
    data=batches(seq_constant_adv=True, max_delta=0.6),
    eps=st.sampled_from([(3e-4, 4e-4), (0.05, 0.1), (0.2, 0.2)]),
)
def test_gspo_matches_sequence_level_reference(data, eps):
    lp0, old, adv, mask = data
    eps_low, eps_high = eps
    loss, grad, m = grad_of(gspo_loss, lp0, old, adv, mask, eps_low=eps_low, eps_high=eps_high)
    ref_loss, ref_grad, ratios = reference_gspo(lp0, old, adv, mask, eps_low, eps_high)
    assert math.isclose(loss.item(), ref_loss, rel_tol=1e-12, abs_tol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    if ratios:
        assert math.isclose(m["seq_ratio_mean"].item(), sum(ratios) / len(ratios), rel_tol=1e-5)
        assert math.isclose(m["seq_ratio_max"].item(), max(ratios), rel_tol=1e-5)


def test_gspo_sequence_ratio_is_exp_mean_log_ratio():
    lp0 = torch.tensor([[-1.0, -2.0, -0.5, -9.0]], dtype=torch.float64)
    old = torch.tensor([[-1.3, -1.5, -0.6, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    adv = torch.ones(1, 4, dtype=torch.float64)
    s = math.exp(((0.3) + (-0.5) + (0.1)) / 3)
    loss, grad, m = grad_of(gspo_loss, lp0, old, adv, mask, eps_low=0.5, eps_high=0.5)
    assert math.isclose(loss.item(), -s, rel_tol=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[-s / 3, -s / 3, -s / 3, 0.0]], dtype=torch.float64))
    assert math.isclose(m["seq_ratio_mean"].item(), s, rel_tol=1e-6)
    # s ~ 0.967 < 1 - 0.01: with A < 0 the whole sequence is clipped together
    loss_c, grad_c, m_c = grad_of(gspo_loss, lp0, old, -adv, mask, eps_low=0.01, eps_high=0.01)
    assert math.isclose(loss_c.item(), 0.99, rel_tol=1e-12)
    assert torch.equal(grad_c, torch.zeros_like(grad_c))
    assert m_c["clipfrac_low"].item() == 1.0


def test_gspo_clips_whole_sequences():
    lp0 = torch.zeros(2, 3, dtype=torch.float64) - 1.0
    old = lp0 - torch.tensor([[0.01, 0.02, 0.0], [-0.4, 0.3, 0.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0] * 3, [1.0] * 3], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    _, grad, m = grad_of(gspo_loss, lp0, old, adv, mask)
    # seq 0: mean log-ratio 0.015 -> s > 1 + 4e-4 -> clipped; seq 1: mean -0.0333 -> unclipped (A > 0)
    assert torch.equal(grad[0], torch.zeros(3, dtype=torch.float64))
    assert (grad[1] != 0).all()
    assert math.isclose(m["clipfrac"].item(), 2 / 5, rel_tol=1e-6)
    assert math.isclose(m["clipfrac_high"].item(), 2 / 5, rel_tol=1e-6)


def test_gspo_default_aggregation_is_seq_mean_token_mean():
    g = torch.Generator().manual_seed(5)
    lp = -torch.rand(3, 4, generator=g)
    old = lp + 0.1 * torch.randn(3, 4, generator=g)
    adv = torch.randn(3, 1, generator=g).expand(3, 4)
    mask = torch.rand(3, 4, generator=g) > 0.3
    a, _ = gspo_loss(lp, old, adv, mask)
    b, _ = gspo_loss(lp, old, adv, mask, loss_agg_mode="seq-mean-token-mean")
    assert torch.equal(a, b)


# ---------------------------------------------------------------------- all the losses


def test_registry():
    assert POLICY_LOSSES == {"cegppo": cegppo_loss, "ppo": ppo_clip_loss, "cispo": cispo_loss, "gspo": gspo_loss}


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("delta", [-100.0, -25.0, 25.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_log_ratios_give_finite_loss_and_gradient(name, mode, delta, dtype):
    lp0 = torch.tensor([[-1.0, -3.0, -0.2, -4.0], [-0.7, -2.0, -5.0, -0.1]])
    old = lp0 - delta
    old[1, 3] = lp0[1, 3] + delta  # mixed directions in one sequence
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-2.0, -2.0, -2.0, -2.0]])
    lp = lp0.to(dtype).requires_grad_(True)
    kw = {"clip_ratio_c": 3.0} if name == "ppo" else {}
    loss, metrics = POLICY_LOSSES[name](lp, old.to(dtype), adv.to(dtype), torch.ones(2, 4), loss_agg_mode=mode, **kw)
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    for key in ("pg_loss", "clipfrac", "approx_kl", "num_tokens"):
        assert torch.isfinite(metrics[key])


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_metric_conventions(name):
    g = torch.Generator().manual_seed(2)
    lp = -torch.rand(4, 6, generator=g) * 3
    old = lp + 0.5 * torch.randn(4, 6, generator=g)
    adv = torch.randn(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.2
    loss, m = POLICY_LOSSES[name](lp.requires_grad_(True), old, adv, mask)
    common = {"clipfrac", "clipfrac_low", "clipfrac_high", "approx_kl", "approx_kl_k3",
              "ratio_mean", "ratio_max", "num_tokens", "pg_loss"}
    quads = {f"quadrant/{q}_{s}" for q in ("pa_hp", "pa_lp", "na_hp", "na_lp")
             for s in ("frac", "clipped", "clipped_frac")}
    assert common | quads <= set(m)
    for v in m.values():
        assert v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad
    assert m["pg_loss"].item() == loss.item()
    assert m["num_tokens"].item() == int(mask.sum())
    n = int(mask.sum())
    r = torch.exp(lp.detach() - old)[mask]
    assert math.isclose(m["ratio_max"].item(), r.max().item(), rel_tol=1e-6)
    assert math.isclose(m["ratio_mean"].item(), r.mean().item(), rel_tol=1e-5)
    quad_sum = sum(m[f"quadrant/{q}_frac"].item() for q in ("pa_hp", "pa_lp", "na_hp", "na_lp"))
    assert math.isclose(quad_sum, int(((adv != 0) & mask).sum()) / n, rel_tol=1e-6)
    clipped = sum(m[f"quadrant/{q}_clipped"].item() for q in ("pa_hp", "pa_lp", "na_hp", "na_lp"))
    assert math.isclose(clipped / n, m["clipfrac"].item(), rel_tol=1e-5, abs_tol=1e-7)
