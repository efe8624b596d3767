"""An entropy-target controller for CE-GPPO's ``beta1`` and ``beta2``.

CE-GPPO keeps a bounded gradient on the tokens its clip cuts off: ``beta1`` scales the one of
low-probability tokens with negative advantage (pushing them further down concentrates the
policy: entropy falls), ``beta2`` the one of low-probability tokens with positive advantage
(pulling them up spreads it: entropy rises). So one signal, ``u``, moves both in opposite
directions, in log space around the configured values::

    beta1 = clamp(beta1_0 * exp(-u)),   beta2 = clamp(beta2_0 * exp(u)),   clamp to [beta_min, beta_max]

``u`` follows a proportional-integral rule on the token entropy measured at each step:

    error = (target - entropy) / target         (0 inside the band: |entropy - target| <= band x target)
    u     = kp * error + ki * integral(error)   clamped to [u_min, u_max]

with ``u_min``/``u_max`` where both betas are at their bounds. The integral is back-calculated
when ``u`` is clamped (it holds exactly what keeps ``u`` at the bound), so a long saturation
stores no windup: the first step of an error of the other sign leaves the bound. The first
``warmup_steps`` steps only measure: their mean entropy is the starting entropy (the target,
when it is a fraction of it). The state is a handful of floats, saved with the checkpoint so
that a resume continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class ControllerState:
    steps_seen: int = 0
    warmup_entropy: list = field(default_factory=list)  # the entropies of the warm-up steps
    target: Optional[float] = None  # resolved at the end of the warm-up
    integral: float = 0.0
    u: float = 0.0


class EntropyController:
    """Between steps: :meth:`update` with the step's entropy gives the next step's betas."""

    def __init__(self, cfg, beta1: float, beta2: float, state: Optional[dict] = None):
        """``cfg``: :class:`megatron_cegppo.config.schema.EntropyControlConfig`; ``beta1``,
        ``beta2``: the configured values (``u = 0``)."""
        self.cfg = cfg
        self.beta1_0, self.beta2_0 = beta1, beta2
        if min(beta1, beta2) <= 0:
            raise ValueError("entropy control moves beta1 and beta2 in log space: both must be > 0")
        lo, hi = math.log(cfg.beta_min), math.log(cfg.beta_max)
        # u beyond which both betas sit at a bound (beta1 falls as u rises, beta2 rises)
        self.u_max = max(hi - math.log(beta2), math.log(beta1) - lo)
        self.u_min = min(lo - math.log(beta2), math.log(beta1) - hi)
        self.state = ControllerState(**state) if state else ControllerState()

    @property
    def betas(self) -> tuple[float, float]:
        """``(beta1, beta2)`` for the next step."""
        u = self.state.u
        clamp = lambda b: min(max(b, self.cfg.beta_min), self.cfg.beta_max)  # noqa: E731
        return clamp(self.beta1_0 * math.exp(-u)), clamp(self.beta2_0 * math.exp(u))

    def error(self, entropy: float) -> float:
        """The relative error of ``entropy`` against the target, 0 inside the band."""
        target = self.state.target
        if abs(entropy - target) <= self.cfg.band * target:
            return 0.0
        return (target - entropy) / target

    def update(self, entropy: float) -> dict:
        """Takes the entropy of the step just run; returns the metrics of the adjustment (the
        betas for the next step among them)."""
        s, c = self.state, self.cfg
        if not math.isfinite(entropy):
            raise ValueError(f"entropy control: the step's entropy is {entropy}")
        s.steps_seen += 1
        if s.target is None:
            s.warmup_entropy.append(float(entropy))
            if len(s.warmup_entropy) >= max(c.warmup_steps, 1):
                start = sum(s.warmup_entropy) / len(s.warmup_entropy)
                s.target = c.target if c.target > 0 else c.target_fraction * start
            return self.metrics(entropy, 0.0)
        e = self.error(entropy)
        s.integral += e
        u = c.kp * e + c.ki * s.integral
        if u > self.u_max or u < self.u_min:
            u = min(max(u, self.u_min), self.u_max)
            # back-calculation: the integral that puts u exactly at the bound (no windup)
            s.integral = (u - c.kp * e) / c.ki if c.ki > 0 else 0.0
        s.u = u
        return self.metrics(entropy, e)

    def metrics(self, entropy: float, error: float) -> dict:
        beta1, beta2 = self.betas
        out = {"control/next_beta1": beta1, "control/next_beta2": beta2, "control/u": self.state.u,
               "control/error": error, "control/integral": self.state.integral}
        if self.state.target is not None:
            out["control/target"] = self.state.target
            out["control/in_band"] = float(abs(entropy - self.state.target) <= self.cfg.band * self.state.target)
        return out

    def state_dict(self) -> dict:
        return asdict(self.state)
