"""CE-GPPO loss: values and gradients against independent references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_cegppo.losses import LOSS_AGG_MODES, POLICY_LOSSES, cegppo_loss, cegppo_token_loss

SETTINGS = settings(max_examples=60, deadline=None)


# ----------------------------------------------------------------------------- references


def textbook_ppo(lp, old, adv, eps_low, eps_high, clip_ratio_c):
    """PPO-clip with dual clip, straight from the formulas (per token, tensors)."""
    r = torch.exp(lp - old)
    loss1 = -adv * r
    loss2 = -adv * torch.clamp(r, 1 - eps_low, 1 + eps_high)
    loss = torch.maximum(loss1, loss2)
    return torch.where(adv < 0, torch.minimum(loss, -adv * clip_ratio_c), loss)


def reference_token(lp, old, a, eps_low, eps_high, beta1, beta2, c):
    """CE-GPPO for one token in plain Python: (loss, d loss / d lp)."""
    r = math.exp(lp - old)
    if a < 0 and r < 1 - eps_low:
        val = grad = -beta1 * (1 - eps_low) * a
    elif a > 0 and r > 1 + eps_high:
        val = grad = -beta2 * (1 + eps_high) * a
    else:
        val = grad = -r * a
    if a < 0 and val > -a * c:
        val, grad = -a * c, 0.0
    return val, grad


def per_token_grad(fn, lp0, old, adv, mask, **kw):
    """Gradient of each token's own loss: token-mean with normalizer 1 is the plain sum."""
    lp = lp0.clone().requires_grad_(True)
    loss, metrics = fn(lp, old, adv, mask, loss_agg_mode="token-mean", normalizer=1.0, **kw)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss, grad, metrics


# ----------------------------------------------------------------------------- strategies


@st.composite
def batches(draw, max_delta=2.0):
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 6))
    n = batch * length
    lp = draw(st.lists(st.floats(-6.0, -0.01), min_size=n, max_size=n))
    delta = draw(st.lists(st.floats(-max_delta, max_delta), min_size=n, max_size=n))
    adv = draw(
        st.lists(st.one_of(st.floats(-3.0, 3.0), st.just(0.0)), min_size=n, max_size=n)
    )
    bits = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    t = lambda v: torch.tensor(v, dtype=torch.float64).reshape(batch, length)  # noqa: E731
    lp_t = t(lp)
    return lp_t, lp_t - t(delta), t(adv), torch.tensor(bits).reshape(batch, length)


eps_values = st.sampled_from([0.0, 0.1, 0.2, 0.28])
beta_values = st.floats(0.0, 2.0)
c_values = st.sampled_from([1.5, 3.0, 10.0])


# ----------------------------------------------------------------------------- properties


@SETTINGS
@given(data=batches(max_delta=3.0), eps_low=eps_values, eps_high=eps_values, c=c_values)
def test_beta_zero_gives_ppo_gradient(data, eps_low, eps_high, c):
    lp0, old, adv, mask = data
    _, grad, _ = per_token_grad(
        cegppo_loss, lp0, old, adv, mask,
        eps_low=eps_low, eps_high=eps_high, beta1=0.0, beta2=0.0, clip_ratio_c=c,
    )
    lp = lp0.clone().requires_grad_(True)
    ref = torch.where(mask, textbook_ppo(lp, old, adv, eps_low, eps_high, c), 0.0).sum()
    (ref_grad,) = torch.autograd.grad(ref, lp)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(
    data=batches(), eps_low=eps_values, eps_high=eps_values, c=c_values,
    beta1=beta_values, beta2=beta_values,
)
def test_matches_per_token_reference(data, eps_low, eps_high, c, beta1, beta2):
    lp0, old, adv, mask = data
    kw = dict(eps_low=eps_low, eps_high=eps_high, beta1=beta1, beta2=beta2, clip_ratio_c=c)
    loss, grad, _ = per_token_grad(cegppo_loss, lp0, old, adv, mask, **kw)
    total = 0.0
    for i in range(lp0.shape[0]):
        for t in range(lp0.shape[1]):
            if not mask[i, t]:
                assert grad[i, t].item() == 0.0
                continue
            val, g = reference_token(lp0[i, t].item(), old[i, t].item(), adv[i, t].item(),
                                     eps_low, eps_high, beta1, beta2, c)
            total += val
            assert math.isclose(grad[i, t].item(), g, rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(loss.item(), total, rel_tol=1e-12, abs_tol=1e-12)


@SETTINGS
@given(
    data=batches(), eps_low=eps_values, eps_high=eps_values, c=c_values,
    betas_a=st.tuples(beta_values, beta_values), betas_b=st.tuples(beta_values, beta_values),
)
def test_unclipped_tokens_do_not_depend_on_beta(data, eps_low, eps_high, c, betas_a, betas_b):
    lp0, old, adv, mask = data
    r = torch.exp(lp0 - old)
    clipped = ((adv < 0) & (r < 1 - eps_low)) | ((adv > 0) & (r > 1 + eps_high))
    keep = mask & ~clipped
    outs = []
    for b1, b2 in (betas_a, betas_b):
        kw = dict(eps_low=eps_low, eps_high=eps_high, beta1=b1, beta2=b2, clip_ratio_c=c)
        _, grad, _ = per_token_grad(cegppo_loss, lp0, old, adv, mask, **kw)
        vals, _ = cegppo_token_loss(lp0, old, adv, **kw)
        outs.append((vals, grad))
    (va, ga), (vb, gb) = outs
    assert torch.equal(va[keep], vb[keep])
    assert torch.equal(ga[keep], gb[keep])
    # and those tokens are plain PPO (-r A, dual-clipped): the textbook loss there
    ref = textbook_ppo(lp0, old, adv, eps_low, eps_high, c)
    torch.testing.assert_close(va[keep], ref[keep], rtol=1e-12, atol=1e-12)


@SETTINGS
@given(
    n=st.integers(1, 8), eps_low=eps_values, eps_high=eps_values,
    beta1=beta_values, beta2=beta_values, seed=st.integers(0, 2**16),
)
def test_clipped_tokens_are_beta_times_ppo_at_boundary(n, eps_low, eps_high, beta1, beta2, seed):
    """One token per sequence; half pushed below the low bound, half above the high bound."""
    g = torch.Generator().manual_seed(seed)
    lp0 = -torch.rand(2 * n, 1, generator=g, dtype=torch.float64) * 4 - 0.1
    # low side: A < 0, r < 1 - eps_low ; high side: A > 0, r > 1 + eps_high
    a_low = -(torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.1)
    a_high = torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.1
    r_low = (1 - eps_low) * (0.05 + 0.9 * torch.rand(n, 1, generator=g, dtype=torch.float64))
    r_high = (1 + eps_high) * (1.05 + 3 * torch.rand(n, 1, generator=g, dtype=torch.float64))
    adv = torch.cat([a_low, a_high])
    ratio = torch.cat([r_low, r_high])
    old = lp0 - torch.log(ratio)
    mask = torch.ones_like(lp0, dtype=torch.bool)
    c = 1e6  # dual clip never active here
    kw = dict(eps_low=eps_low, eps_high=eps_high, beta1=beta1, beta2=beta2, clip_ratio_c=c)

    # per-token values via the seq-mean-token-sum path with normalizer 1 (= sum of tokens)
    lp = lp0.clone().requires_grad_(True)
    loss, metrics = cegppo_loss(lp, old, adv, mask, loss_agg_mode="seq-mean-token-sum", normalizer=1, **kw)
    (grad,) = torch.autograd.grad(loss, lp)
    vals, _ = cegppo_token_loss(lp0, old, adv, **kw)

    ppo_clipped_value = -adv * torch.clamp(torch.exp(lp0 - old), 1 - eps_low, 1 + eps_high)
    beta = torch.cat(
        [torch.full((n, 1), beta1, dtype=torch.float64), torch.full((n, 1), beta2, dtype=torch.float64)]
    )
    torch.testing.assert_close(vals, beta * ppo_clipped_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, (beta * ppo_clipped_value).sum(), rtol=1e-12, atol=1e-12)
    expect_grad = torch.cat([-beta1 * (1 - eps_low) * a_low, -beta2 * (1 + eps_high) * a_high])
    torch.testing.assert_close(grad, expect_grad, rtol=1e-12, atol=1e-12)
    assert metrics["clipfrac_low"].item() == 0.5 and metrics["clipfrac_high"].item() == 0.5


def test_gppo_and_paper_defaults():
    """beta1 = beta2 = 1 keeps the full boundary gradient (GPPO)."""
    lp = torch.tensor([[-1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0 + 1.0, -1.0 - 1.0]], dtype=torch.float64)  # r = e^-1, r = e^1
    adv = torch.tensor([[-2.0, 3.0]], dtype=torch.float64)
    mask = torch.ones(1, 2)
    loss, _ = cegppo_loss(lp, old, adv, mask, beta1=1.0, beta2=1.0, normalizer=1)
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, torch.tensor([[0.8 * 2.0, -1.2 * 3.0]], dtype=torch.float64))
    # defaults: beta1 = 0.5, beta2 = 1
    lp2 = lp.detach().clone().requires_grad_(True)
    loss2, _ = cegppo_loss(lp2, old, adv, mask, normalizer=1)
    (grad2,) = torch.autograd.grad(loss2, lp2)
    torch.testing.assert_close(grad2, torch.tensor([[0.5 * 0.8 * 2.0, -1.2 * 3.0]], dtype=torch.float64))
    torch.testing.assert_close(loss2, torch.tensor(0.5 * 0.8 * 2.0 - 1.2 * 3.0, dtype=torch.float64))


@pytest.mark.parametrize("delta", [3.0, 10.0, 100.0, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dual_clip_caps_loss_with_zero_gradient(delta, dtype):
    c = 3.0
    adv = torch.tensor([[-1.5, -0.5]], dtype=dtype)
    lp0 = torch.tensor([[-2.0, -0.5]], dtype=dtype)
    old = lp0 - delta
    lp = lp0.clone().requires_grad_(True)
    loss, metrics = cegppo_loss(lp, old, adv, torch.ones(1, 2), clip_ratio_c=c, normalizer=1)
    (grad,) = torch.autograd.grad(loss, lp)
    assert math.isclose(loss.item(), (1.5 + 0.5) * c, rel_tol=1e-6)
    assert torch.equal(grad, torch.zeros_like(grad))
    assert metrics["dualclip_frac"].item() == 1.0
    assert metrics["clipfrac"].item() == 0.0


@pytest.mark.parametrize("delta", [-100.0, -30.0, 30.0, 100.0])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_extreme_log_ratios_stay_finite(delta, mode):
    lp0 = torch.tensor([[-1.0, -3.0, -0.2], [-0.7, -2.0, -5.0]])
    old = lp0 - delta
    adv = torch.tensor([[1.0, -1.0, 0.0], [-2.0, 2.0, 0.5]])
    lp = lp0.clone().requires_grad_(True)
    loss, metrics = cegppo_loss(lp, old, adv, torch.ones(2, 3), loss_agg_mode=mode)
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # clipped high-side tokens keep a finite gradient even when exp(delta) overflows
    if delta > 0:
        assert grad[0, 0] != 0 and grad[1, 1] != 0


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_masked_tokens_get_exactly_zero_gradient_even_with_nan(name, mode):
    g = torch.Generator().manual_seed(0)
    lp0 = -torch.rand(3, 5, generator=g) * 2
    old = lp0 + 0.3 * torch.randn(3, 5, generator=g)
    adv = torch.randn(3, 5, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    mask[1] = False
    mask[0, 0] = True
    bad = ~mask
    lp_bad = lp0.clone()
    lp_bad[bad] = float("nan")
    lp_bad[2, bad[2]] = float("-inf")
    old_bad = old.clone()
    old_bad[bad] = float("inf")
    adv_bad = adv.clone()
    adv_bad[bad] = float("nan")
    ent = torch.rand(3, 5, generator=g)
    ent[bad] = float("nan")
    fn = POLICY_LOSSES[name]

    lp = lp_bad.clone().requires_grad_(True)
    loss, metrics = fn(lp, old_bad, adv_bad, mask, loss_agg_mode=mode, entropy=ent)
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[bad], torch.zeros_like(grad[bad]))
    assert all(torch.isfinite(v) for v in metrics.values())

    # same result as with clean values at the masked positions
    lp_clean = lp0.clone().requires_grad_(True)
    loss_clean, _ = fn(lp_clean, old, adv, mask, loss_agg_mode=mode, entropy=ent.nan_to_num(0.0))
    (grad_clean,) = torch.autograd.grad(loss_clean, lp_clean)
    assert torch.equal(loss, loss_clean)
    assert torch.equal(grad, grad_clean)


def test_bf16_inputs_and_float_mask():
    g = torch.Generator().manual_seed(1)
    lp32 = -torch.rand(2, 4, generator=g) * 2
    old32 = lp32 + 0.4 * torch.randn(2, 4, generator=g)
    adv32 = torch.randn(2, 4, generator=g)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    lp = lp32.to(torch.bfloat16).requires_grad_(True)
    loss, metrics = cegppo_loss(lp, old32.to(torch.bfloat16), adv32.to(torch.bfloat16), mask)
    loss.backward()
    assert loss.dtype == torch.float32
    assert lp.grad.dtype == torch.bfloat16
    ref, _ = cegppo_loss(
        lp.detach().float(), old32.to(torch.bfloat16).float(), adv32.to(torch.bfloat16).float(), mask.bool()
    )
    assert torch.equal(loss.detach(), ref)
    assert metrics["num_tokens"].item() == 5


# ----------------------------------------------------------------------------- metrics


def _hand_metrics(lp, old, adv, mask, eps_low, eps_high, beta1, beta2, c, hp_threshold, entropy=None):
    n = 0
    low = high = dual = 0
    kl = k3 = 0.0
    quad = {q: [0, 0] for q in ("pa_hp", "pa_lp", "na_hp", "na_lp")}
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not mask[i, t]:
                continue
            n += 1
            x, o, a = lp[i, t].item(), old[i, t].item(), adv[i, t].item()
            r = math.exp(x - o)
            kl += o - x
            k3 += r - 1 - (x - o)
            is_low = a < 0 and r < 1 - eps_low
            is_high = a > 0 and r > 1 + eps_high
            low += is_low
            high += is_high
            if is_low:
                pre = -beta1 * (1 - eps_low) * a
            elif is_high:
                pre = -beta2 * (1 + eps_high) * a
            else:
                pre = -r * a
            dual += a < 0 and pre > -a * c
            if a != 0:
                lp_flag = (x < -entropy[i, t].item()) if entropy is not None else (math.exp(x) < hp_threshold)
                q = ("pa" if a > 0 else "na") + ("_lp" if lp_flag else "_hp")
                quad[q][0] += 1
                quad[q][1] += is_low or is_high
    return n, low, high, dual, kl, k3, quad


@SETTINGS
@given(
    data=batches(), eps_low=eps_values, eps_high=eps_values, c=c_values,
    beta1=beta_values, beta2=beta_values, use_entropy=st.booleans(),
    hp_threshold=st.sampled_from([0.1, 0.5, 0.9]),
)
def test_metrics_match_hand_count(data, eps_low, eps_high, c, beta1, beta2, use_entropy, hp_threshold):
    lp0, old, adv, mask = data
    entropy = (torch.rand(lp0.shape, dtype=torch.float64) * 3) if use_entropy else None
    kw = dict(eps_low=eps_low, eps_high=eps_high, beta1=beta1, beta2=beta2, clip_ratio_c=c)
    loss, m = cegppo_loss(lp0, old, adv, mask, entropy=entropy, hp_threshold=hp_threshold, **kw)
    n, low, high, dual, kl, k3, quad = _hand_metrics(
        lp0, old, adv, mask, eps_low, eps_high, beta1, beta2, c, hp_threshold, entropy
    )
    d = max(n, 1)
    for v in m.values():
        assert v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad
    close = lambda a, b: math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)  # noqa: E731
    assert m["num_tokens"].item() == n
    assert close(m["clipfrac_low"].item(), low / d)
    assert close(m["clipfrac_high"].item(), high / d)
    assert close(m["clipfrac"].item(), (low + high) / d)
    assert close(m["dualclip_frac"].item(), dual / d)
    assert close(m["approx_kl"].item(), kl / d)
    assert close(m["approx_kl_k3"].item(), k3 / d)
    assert close(m["pg_loss"].item(), loss.item())
    nonzero_adv = int(((adv != 0) & mask).sum())
    total_frac = sum(m[f"quadrant/{q}_frac"].item() for q in quad)
    assert close(total_frac, nonzero_adv / d)
    for q, (size, clipped) in quad.items():
        assert close(m[f"quadrant/{q}_frac"].item(), size / d)
        assert m[f"quadrant/{q}_clipped"].item() == clipped
        assert close(m[f"quadrant/{q}_clipped_frac"].item(), clipped / size if size else 0.0)


def test_entropy_criterion_replaces_probability_threshold():
    # p = 0.7 (HP by the 0.5 threshold) but lp = -0.357 < -H = -0.2: LP by entropy;
    # p = 0.3 (LP by threshold) but lp = -1.2 > -H = -2.0: HP by entropy.
    lp = torch.log(torch.tensor([[0.7, 0.3, 0.7, 0.3]]))
    old = lp.clone()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    ent = torch.tensor([[0.2, 2.0, 0.2, 2.0]])
    _, by_p = cegppo_loss(lp, old, adv, mask)
    _, by_h = cegppo_loss(lp, old, adv, mask, entropy=ent)
    assert [by_p[f"quadrant/{q}_frac"].item() for q in ("pa_hp", "pa_lp", "na_hp", "na_lp")] == [0.25] * 4
    assert by_h["quadrant/pa_lp_frac"].item() == 0.25  # token 0 moved HP -> LP
    assert by_h["quadrant/pa_hp_frac"].item() == 0.25  # token 1 moved LP -> HP
    _, one = cegppo_loss(lp[:, :1], old[:, :1], adv[:, :1], mask[:, :1], entropy=ent[:, :1])
    _, one_p = cegppo_loss(lp[:, :1], old[:, :1], adv[:, :1], mask[:, :1])
    assert one["quadrant/pa_lp_frac"].item() == 1.0 and one["quadrant/pa_hp_frac"].item() == 0.0
    assert one_p["quadrant/pa_hp_frac"].item() == 1.0


def test_all_masked_batch():
    lp = torch.randn(2, 3, requires_grad=True)
    loss, m = cegppo_loss(lp, torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(lp.grad, torch.zeros(2, 3))
    assert m["num_tokens"].item() == 0 and m["clipfrac"].item() == 0 and m["ratio_max"].item() == 0
