"""Policy losses: CE-GPPO and the PPO/GRPO/DAPO, CISPO and GSPO baselines.

Every policy loss has the signature::

    fn(log_prob, old_log_prob, advantages, response_mask, *, <loss params>,
       loss_agg_mode="token-mean", normalizer=None, entropy=None, hp_threshold=0.5,
       check_finite=True) -> (loss, metrics)

with ``[batch, response_len]`` inputs, a 0-dim loss and a dict of detached float32
0-dim metric tensors.
"""

from .aggregation import LOSS_AGG_MODES, aggregate_loss, loss_normalizer
from .baselines import cispo_loss, gspo_loss, ppo_clip_loss
from .cegppo import cegppo_loss, cegppo_token_loss

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
    if loss not in LOSS_CONFIG_KEYS:
        raise ValueError(f"unknown policy loss {loss!r}; choose one of {sorted(LOSS_CONFIG_KEYS)}")
    return {key: getattr(algorithm, key) for key in LOSS_CONFIG_KEYS[loss]}

__all__ = [
    "cegppo_loss",
    "cegppo_token_loss",
    "ppo_clip_loss",
    "cispo_loss",
    "gspo_loss",
    "aggregate_loss",
    "loss_normalizer",
    "POLICY_LOSSES",
    "LOSS_CONFIG_KEYS",
    "loss_kwargs",
    "LOSS_AGG_MODES",
]
