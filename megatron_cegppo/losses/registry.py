"""What each loss name of :mod:`.names` stands for: its function and its config settings."""

from __future__ import annotations

from .baselines import cispo_loss, gspo_loss, ppo_clip_loss
from .cegppo import cegppo_loss
from .names import LOSS_NAMES, check_choice

__all__ = ["POLICY_LOSSES", "LOSS_CONFIG_KEYS", "loss_kwargs"]

POLICY_LOSSES = {
    "cegppo": cegppo_loss,
    "ppo": ppo_clip_loss,
    "cispo": cispo_loss,
    "gspo": gspo_loss,
}

# What each loss takes from the run's ``algorithm`` config section (same names there). GSPO's
# sequence-ratio clip range (3e-4/4e-4) is of another scale than the token losses' eps, so it
# keeps its own defaults; CISPO clips its weight from above only.
LOSS_CONFIG_KEYS = {
    "cegppo": ("eps_low", "eps_high", "beta1", "beta2", "clip_ratio_c"),
    "ppo": ("eps_low", "eps_high", "clip_ratio_c"),
    "cispo": ("eps_high",),
    "gspo": (),
}


def loss_kwargs(loss: str, algorithm) -> dict:
    """The keyword arguments of loss ``loss`` from an ``algorithm`` config section."""
    check_choice("policy loss", loss, sorted(LOSS_NAMES))
    return {key: getattr(algorithm, key) for key in LOSS_CONFIG_KEYS[loss]}
