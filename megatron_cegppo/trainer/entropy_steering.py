"""The entropy-target controller as the trainer drives it: its betas into the policy's loss
before a step's update, the step's entropy into the controller after it, its state with the
checkpoint (:mod:`megatron_cegppo.algorithms.entropy_control` holds the rule)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from megatron_cegppo.algorithms.entropy_control import EntropyController
from megatron_cegppo.config.schema import AlgorithmConfig

STATE_KEY = "entropy_control"


class EntropySteering:
    def __init__(self, controller: EntropyController):
        self.controller = controller

    @classmethod
    def of(cls, algorithm: AlgorithmConfig, extra: dict) -> Optional["EntropySteering"]:
        """The run's steering (``None`` when entropy control is off), continuing from the
        resumed checkpoint's ``extra`` state."""
        c = algorithm.entropy_control
        if not c.enabled:
            return None
        return cls(EntropyController(c, algorithm.beta1, algorithm.beta2, state=extra.get(STATE_KEY)))

    def apply(self, policy) -> dict:
        """Sets the controller's betas in ``policy``'s loss; the values, as metrics."""
        beta1, beta2 = self.controller.betas
        policy.spec = dataclasses.replace(policy.spec, loss_kwargs={**policy.spec.loss_kwargs, "beta1": beta1,
                                                                    "beta2": beta2})
        return {"control/beta1": beta1, "control/beta2": beta2}

    def observe(self, entropy: float) -> dict:
        """The step's token entropy (the same on every rank) into the controller; the
        adjustment's metrics. A step without a finite entropy (every mini-batch skipped as
        non-finite) leaves the controller as it was."""
        if not math.isfinite(entropy):
            return {}
        return self.controller.update(entropy)

    def extra_state(self) -> dict:
        return {STATE_KEY: self.controller.state_dict()}
