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

__all__ = [
    "cegppo_loss",
    "cegppo_token_loss",
    "ppo_clip_loss",
    "cispo_loss",
    "gspo_loss",
    "aggregate_loss",
    "loss_normalizer",
    "POLICY_LOSSES",
    "LOSS_AGG_MODES",
]
