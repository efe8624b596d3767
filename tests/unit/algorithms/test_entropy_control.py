"""The entropy-target controller's rule on synthetic entropy sequences: warm-up and target,
the band, a step response that settles in the band, saturation at the bounds without windup,
and a state that continues exactly after a save."""

from __future__ import annotations

import json
import math

import pytest

from megatron_cegppo.algorithms.entropy_control import EntropyController
from megatron_cegppo.config.schema import EntropyControlConfig


def controller(**changes) -> EntropyController:
    cfg = EntropyControlConfig(enabled=True, **{"warmup_steps": 2, **changes})
    return EntropyController(cfg, beta1=0.5, beta2=1.0)


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
    absolute = controller(warmup_steps=1, target=0.7)
    absolute.update(0.1)
    assert absolute.state.target == 0.7


def test_inside_the_band_nothing_moves():
    c = controller(target=1.0, band=0.1, warmup_steps=1)
    c.update(1.0)
    for h in (0.91, 1.09, 1.0, 0.95):
        m = c.update(h)
        assert m["control/error"] == 0.0 and c.state.integral == 0.0 and c.betas == (0.5, 1.0)
        assert m["control/in_band"] == 1.0


def test_low_entropy_raises_beta2_and_lowers_beta1():
    c = controller(target=1.0, warmup_steps=1)
    c.update(1.0)
    c.update(0.5)  # below target: more exploration wanted
    beta1, beta2 = c.betas
    assert beta2 > 1.0 and beta1 < 0.5
    assert math.log(beta2 / 1.0) == pytest.approx(-math.log(beta1 / 0.5))  # symmetric in log space


@pytest.mark.parametrize("start", [0.2, 1.6])
def test_step_response_settles_in_the_band(start):
    c = controller(target=0.8, band=0.1, warmup_steps=1, kp=1.0, ki=0.2)
    seen = plant(c, start, 400)
    tail = seen[-100:]
    assert all(abs(h - 0.8) <= 0.1 * 0.8 for h in tail), (min(tail), max(tail))
    # the betas hold the plant's rest point (u = 0.3), reached through the integral
    assert c.state.u == pytest.approx(0.3, abs=0.1)


def test_saturation_at_the_bounds_and_no_windup():
    c = controller(target=1.0, warmup_steps=1, kp=1.0, ki=0.5, beta_min=0.1, beta_max=2.0)
    c.update(1.0)
    for _ in range(200):  # entropy far below target, for long: u pinned at its top
        c.update(0.1)
    assert c.state.u == pytest.approx(c.u_max)
    beta1, beta2 = c.betas
    assert beta2 == pytest.approx(2.0) and beta1 == pytest.approx(0.1)  # both at their bounds
    assert c.u_max == pytest.approx(max(math.log(2.0 / 1.0), math.log(0.5 / 0.1)))
    # back-calculated: the integral is what keeps u at the bound, not 200 steps' worth
    assert c.state.integral == pytest.approx((c.u_max - 1.0 * 0.9) / 0.5)
    u_top = c.state.u
    c.update(3.0)  # the error changes sign: u leaves the bound at once
    assert c.state.u < u_top - 1.0
    assert c.betas[1] < 2.0


def test_the_lower_bound_too():
    c = controller(target=1.0, warmup_steps=1, beta_min=0.1, beta_max=2.0)
    c.update(1.0)
    for _ in range(100):
        c.update(5.0)
    assert c.state.u == pytest.approx(c.u_min)
    assert c.betas == (pytest.approx(2.0), pytest.approx(0.1))


def test_a_saved_state_continues_exactly():
    a = controller(target=0.8, warmup_steps=3)
    plant(a, 0.3, 17)
    saved = json.loads(json.dumps(a.state_dict()))  # as the checkpoint's trainer_state.json holds it
    b = EntropyController(a.cfg, 0.5, 1.0, state=saved)
    for h in (0.31, 0.5, 0.9, 1.2, 0.75):
        assert a.update(h) == b.update(h)
    assert a.state_dict() == b.state_dict()


def test_refusals():
    with pytest.raises(ValueError, match="log space"):
        EntropyController(EntropyControlConfig(enabled=True), beta1=0.0, beta2=1.0)
    c = controller(warmup_steps=1)
    with pytest.raises(ValueError, match="entropy is nan"):
        c.update(float("nan"))
