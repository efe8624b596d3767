"""The entropy-target controller's rule on synthetic entropy sequences: warm-up and target,
the band, a step response that settles in the band, the smoothed entropy, the wait for the
band, saturation at each beta's bounds without windup, and a state that continues exactly
after a save."""

from __future__ import annotations

import json
import math

import pytest

from megatron_cegppo.algorithms.entropy_control import EntropyController
from megatron_cegppo.config.schema import EntropyControlConfig


def controller(**changes) -> EntropyController:
    cfg = EntropyControlConfig(enabled=True, **{"warmup_steps": 2, **changes})
    return EntropyController(cfg, beta1=0.5, beta2=1.0)


def raw(**changes) -> EntropyController:
    """The bare PI rule: on the step's entropy, acting right after the warm-up."""
    return controller(**{"smoothing": 0.0, "wait_for_band": False, **changes})


def plant(c: EntropyController, entropy: float, steps: int, *, gain=0.05, u_rest=0.3) -> list[float]:
    """A policy whose entropy drifts up when u is above ``u_rest`` and down below it (the
    controller does not know ``u_rest``); the entropies seen."""
    seen = []
    for _ in range(steps):
        c.update(entropy)
        seen.append(entropy)
        entropy = max(entropy + gain * (c.state.u - u_rest), 1e-3)
    return seen


def test_warm_up_only_measures_then_sets_the_target():
    c = controller(warmup_steps=3, target_fraction=0.5)
    for h in (0.4, 0.5, 0.6):
        m = c.update(h)
        assert c.betas == (0.5, 1.0) and m["control/u"] == 0.0
    assert c.state.target == pytest.approx(0.25)  # half of the mean 0.5
    assert c.state.smoothed == pytest.approx(0.5)  # the average starts at the warm-up's mean
    absolute = controller(warmup_steps=1, target=0.7)
    absolute.update(0.1)
    assert absolute.state.target == 0.7


def test_inside_the_band_nothing_moves():
    c = raw(target=1.0, band=0.1, warmup_steps=1)
    c.update(1.0)
    for h in (0.91, 1.09, 1.0, 0.95):
        m = c.update(h)
        assert m["control/error"] == 0.0 and c.state.integral == 0.0 and c.betas == (0.5, 1.0)
        assert m["control/in_band"] == 1.0


def test_low_entropy_raises_beta2_and_lowers_beta1():
    c = raw(target=1.0, warmup_steps=1)
    c.update(1.0)
    c.update(0.5)  # below target: more exploration wanted
    beta1, beta2 = c.betas
    assert beta2 > 1.0 and beta1 < 0.5
    assert math.log(beta2 / 1.0) == pytest.approx(-math.log(beta1 / 0.5))  # symmetric in log space


@pytest.mark.parametrize("start", [0.2, 1.6])
@pytest.mark.parametrize("settings", [{"smoothing": 0.0, "wait_for_band": False}, {}],
                         ids=["raw", "defaults"])
def test_step_response_settles_in_the_band(start, settings):
    c = controller(target=0.8, band=0.1, warmup_steps=1, **settings)
    seen = plant(c, start, 400)
    tail = seen[-100:]
    assert all(abs(h - 0.8) <= 0.1 * 0.8 for h in tail), (min(tail), max(tail))
    # the betas hold the plant's rest point (u = 0.3), reached through the integral
    assert c.state.u == pytest.approx(0.3, abs=0.1)


def test_the_error_is_on_the_smoothed_entropy():
    c = controller(target=1.0, warmup_steps=2, smoothing=0.8, wait_for_band=False)
    c.update(1.1)
    c.update(0.9)  # the average starts at the warm-up's mean, 1.0
    # m <- 0.8 m + 0.2 h, by hand: 0.8 + 0.2, 0.8 + 0.19, 0.792 + 0.21, 0.8016 + 0.14, 0.75328 + 0.12
    by_hand = [1.0, 0.99, 1.002, 0.9416, 0.87328]
    for h, m in zip((1.0, 0.95, 1.05, 0.7, 0.6), by_hand):
        got = c.update(h)
        assert c.state.smoothed == pytest.approx(m) and got["control/entropy_smoothed"] == pytest.approx(m)
        assert got["control/error"] == (0.0 if abs(m - 1.0) <= 0.1 else pytest.approx(1.0 - m))
        assert got["control/in_band"] == float(abs(h - 1.0) <= 0.1)  # judged on the step's own entropy
    assert c.state.u == pytest.approx(1.0 * 0.12672 + 0.05 * 0.12672)  # the first error outside the band


def test_smoothing_damps_a_single_step_spike():
    def u_after_spike(smoothing):
        c = controller(target=1.0, warmup_steps=1, smoothing=smoothing, wait_for_band=False)
        for h in (1.0, 1.0, 1.0, 0.3):  # on target, then one noisy step far below
            c.update(h)
        return c.state.u

    smoothed, unsmoothed = u_after_spike(0.8), u_after_spike(0.0)
    assert 0 < smoothed < unsmoothed / 3
    assert smoothed == pytest.approx(1.05 * (1.0 - (0.8 + 0.2 * 0.3)))  # kp e + ki e, e = 0.14


def test_waits_for_the_entropy_to_come_down_to_the_band():
    falling = [1.0, 0.98, 0.95, 0.92, 0.9, 0.88, 0.86, 0.84, 0.82, 0.8, 0.8, 0.8]
    c = controller(target_fraction=0.8, band=0.1, warmup_steps=1)  # target 0.8, band top 0.88
    c.update(falling[0])
    waited = 0
    for h in falling[1:]:
        m = c.update(h)
        if c.state.smoothed > 0.88:
            waited += 1
            assert not c.state.engaged and m["control/engaged"] == 0.0
            assert c.state.u == 0.0 and c.state.integral == 0.0 and c.betas == (0.5, 1.0)
        else:
            assert c.state.engaged and m["control/engaged"] == 1.0
    assert waited == 8 and c.state.smoothed <= 0.88  # the average lags: the step entropy got there at 0.88
    for _ in range(10):  # engaged for good: entropy below the band now raises u
        c.update(0.5)
    assert c.state.u > 0 and c.betas[0] < 0.5 and c.betas[1] > 1.0
    for _ in range(30):
        c.update(1.5)  # and above it lowers u: it acts in both directions
    assert c.state.u < 0 and c.state.engaged

    eager = controller(target_fraction=0.8, band=0.1, warmup_steps=1, wait_for_band=False)
    eager.update(falling[0])
    eager.update(falling[1])
    assert eager.state.engaged and eager.state.u < 0 and eager.betas[0] > 0.5  # at once, against it


def test_a_start_inside_the_band_acts_at_once():
    c = controller(target=1.0, warmup_steps=1)
    c.update(1.05)  # the warm-up's mean is already below the band's top
    assert c.state.engaged
    c.update(0.2)
    assert c.state.u > 0


@pytest.mark.parametrize("bounds", [{}, {"beta1_min": 0.1, "beta2_max": 3.0, "beta2_min": 0.8}])
def test_saturation_at_each_betas_bounds_and_no_windup(bounds):
    c = raw(target=1.0, warmup_steps=1, ki=0.5, **bounds)
    cfg = c.cfg
    assert c.u_max == pytest.approx(max(math.log(cfg.beta2_max / 1.0), math.log(0.5 / cfg.beta1_min)))
    assert c.u_min == pytest.approx(min(math.log(cfg.beta2_min / 1.0), math.log(0.5 / cfg.beta1_max)))
    c.update(1.0)
    for _ in range(200):  # entropy far below target, for long: u pinned at its top
        c.update(0.1)
    assert c.state.u == pytest.approx(c.u_max)
    assert c.betas == (pytest.approx(cfg.beta1_min), pytest.approx(cfg.beta2_max))  # both at their bounds
    # back-calculated: the integral is what keeps u at the bound, not 200 steps' worth
    assert c.state.integral == pytest.approx((c.u_max - 1.0 * 0.9) / 0.5)
    c.update(1.5)  # the error changes sign: u leaves the bound at once
    assert c.state.u < c.u_max and c.betas[1] < cfg.beta2_max and c.betas[0] > cfg.beta1_min

    for _ in range(200):  # far above target, for long: the other bounds
        c.update(5.0)
    assert c.state.u == pytest.approx(c.u_min)
    assert c.betas == (pytest.approx(cfg.beta1_max), pytest.approx(cfg.beta2_min))
    c.update(0.5)
    assert c.state.u > c.u_min and c.betas[0] < cfg.beta1_max and c.betas[1] > cfg.beta2_min


def test_the_default_bounds():
    c = controller()
    assert c.u_max == pytest.approx(math.log(2)) and c.u_min == pytest.approx(-math.log(2))
    c.state.u = 5.0
    assert c.betas == (0.25, 2.0)
    c.state.u = -5.0
    assert c.betas == (1.0, 0.5)


@pytest.mark.parametrize("steps", [3, 12, 40], ids=["in-warm-up", "waiting", "engaged"])
def test_a_saved_state_continues_exactly(steps):
    a = controller(target_fraction=0.8, warmup_steps=3)  # the defaults: smoothed, waiting for the band
    plant(a, 1.2, steps, gain=0.02, u_rest=0.5)  # the entropy falls by itself at u = 0
    saved = json.loads(json.dumps(a.state_dict()))  # as the checkpoint's trainer_state.json holds it
    assert {"smoothed", "engaged"} <= set(saved)
    b = EntropyController(a.cfg, 0.5, 1.0, state=saved)
    for h in (1.1, 0.9, 0.75, 0.5, 0.4, 1.3, 0.7):
        assert a.update(h) == b.update(h)
    assert a.state_dict() == b.state_dict()
    assert plant(a, 0.6, 30) == plant(b, 0.6, 30) and a.state_dict() == b.state_dict()


def test_a_state_saved_before_smoothing_resumes_acting():
    old = {"steps_seen": 9, "warmup_entropy": [1.0], "target": 0.8, "integral": 1.0, "u": 0.3}
    c = EntropyController(controller().cfg, 0.5, 1.0, state=old)
    assert c.state.engaged  # it was acting since its warm-up
    c.update(0.4)
    assert c.state.smoothed == pytest.approx(0.4) and c.state.u > 0.3


def test_refusals():
    with pytest.raises(ValueError, match="log space"):
        EntropyController(EntropyControlConfig(enabled=True), beta1=0.0, beta2=1.0)
    c = controller(warmup_steps=1)
    with pytest.raises(ValueError, match="entropy is nan"):
        c.update(float("nan"))
