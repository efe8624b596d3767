"""An entropy-target controller for CE-GPPO's ``beta1`` and ``beta2``.

CE-GPPO keeps a bounded gradient on the tokens its clip cuts off: ``beta1`` scales the one of
low-probability tokens with negative advantage (pushing them further down concentrates the
policy: entropy falls), ``beta2`` the one of low-probability tokens with positive advantage
(pulling them up spreads it: entropy rises). So one signal, ``u``, moves both in opposite
directions, in log space around the configured values::

    beta1 = clamp(beta1_0 * exp(-u), beta1_min, beta1_max)
    beta2 = clamp(beta2_0 * exp(u),  beta2_min, beta2_max)

``u`` follows a proportional-integral rule on the token entropy, smoothed over steps (the
entropy of one step is noisy, measured at about +-8%, and a raw error chases that noise)::

    m     <- smoothing * m + (1 - smoothing) * entropy      (m starts at the warm-up's mean)
    error = (target - m) / target          (0 inside the band: |m - target| <= band x target)
    u     = kp * error + ki * integral(error)   clamped to [u_min, u_max]

with ``u_min``/``u_max`` where both betas are at their bounds. The integral is back-calculated
when ``u`` is clamped (it holds exactly what keeps ``u`` at the bound), so a long saturation
stores no windup: the first step of an error of the other sign leaves the bound. The first
``warmup_steps`` steps only measure: their mean entropy is the starting entropy (the target,
when it is a fraction of it).

With ``wait_for_band`` the controller then holds ``u = 0`` until the smoothed entropy first
comes down to the band's top, and only from then on acts, in both directions. Learning itself
lowers the entropy: pushing it down further before it has come down by itself fights nothing,
and was measured to drive ``beta1`` to its bound (and the reward down with it).

The state is a handful of numbers, saved with the checkpoint so that a resume continues
exactly.
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
    smoothed: Optional[float] = None  # the entropy's moving average, from the end of the warm-up
    engaged: bool = False  # acting (with wait_for_band: since the smoothed entropy reached the band)


class EntropyController:
    """Between steps: :meth:`update` with the step's entropy gives the next step's betas."""

    def __init__(self, cfg, beta1: float, beta2: float, state: Optional[dict] = None):
        """``cfg``: :class:`megatron_cegppo.config.schema.EntropyControlConfig`; ``beta1``,
        ``beta2``: the configured values (``u = 0``)."""
        self.cfg = cfg
        self.beta1_0, self.beta2_0 = beta1, beta2
        if min(beta1, beta2) <= 0:
            raise ValueError("entropy control moves beta1 and beta2 in log space: both must be > 0")
        # u beyond which both betas sit at a bound (beta1 falls as u rises, beta2 rises)
        self.u_max = max(math.log(cfg.beta2_max / beta2), math.log(beta1 / cfg.beta1_min))
        self.u_min = min(math.log(cfg.beta2_min / beta2), math.log(beta1 / cfg.beta1_max))
        if state and "engaged" not in state:  # saved before the wait for the band: acting after its warm-up
            state = {**state, "engaged": state.get("target") is not None}
        self.state = ControllerState(**state) if state else ControllerState()

    @property
    def betas(self) -> tuple[float, float]:
        """``(beta1, beta2)`` for the next step."""
        u, c = self.state.u, self.cfg
        beta1 = min(max(self.beta1_0 * math.exp(-u), c.beta1_min), c.beta1_max)
        beta2 = min(max(self.beta2_0 * math.exp(u), c.beta2_min), c.beta2_max)
        return beta1, beta2

    def in_band(self, entropy: float) -> bool:
        return abs(entropy - self.state.target) <= self.cfg.band * self.state.target

    def error(self, entropy: float) -> float:
        """The relative error of ``entropy`` against the target, 0 inside the band."""
        if self.in_band(entropy):
            return 0.0
        return (self.state.target - entropy) / self.state.target

    def _engages(self) -> bool:
        """Whether the controller acts from now on (see the module's docstring)."""
        s = self.state
        return not self.cfg.wait_for_band or s.smoothed <= s.target * (1 + self.cfg.band)

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
                s.smoothed = start
                s.engaged = self._engages()
            return self.metrics(entropy, 0.0)
        m = entropy if s.smoothed is None else s.smoothed  # None: a state saved before smoothing
        s.smoothed = c.smoothing * m + (1 - c.smoothing) * float(entropy)
        if not s.engaged:
            s.engaged = self._engages()
            if not s.engaged:  # u and the integral stay 0: the configured betas
                return self.metrics(entropy, 0.0)
        e = self.error(s.smoothed)
        s.integral += e
        u = c.kp * e + c.ki * s.integral
        if u > self.u_max or u < self.u_min:
            u = min(max(u, self.u_min), self.u_max)
            # back-calculation: the integral that puts u exactly at the bound (no windup)
            s.integral = (u - c.kp * e) / c.ki if c.ki > 0 else 0.0
        s.u = u
        return self.metrics(entropy, e)

    def metrics(self, entropy: float, error: float) -> dict:
        s = self.state
        beta1, beta2 = self.betas
        out = {"control/next_beta1": beta1, "control/next_beta2": beta2, "control/u": s.u,
               "control/error": error, "control/integral": s.integral, "control/engaged": float(s.engaged)}
        if s.target is not None:
            out["control/target"] = s.target
            out["control/entropy_smoothed"] = s.smoothed
            out["control/in_band"] = float(self.in_band(entropy))  # the raw step's, as reports compare
        return out

    def state_dict(self) -> dict:
        return asdict(self.state)
