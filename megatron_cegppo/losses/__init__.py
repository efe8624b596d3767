"""Policy losses: CE-GPPO and the PPO/GRPO/DAPO, CISPO and GSPO baselines.

Every policy loss has the signature::

    fn(log_prob, old_log_prob, advantages, response_mask, *, <loss params>,
       loss_agg_mode="token-mean", normalizer=None, entropy=None, hp_threshold=0.5,
       check_finite=True) -> (loss, metrics)

with ``[batch, response_len]`` inputs, a 0-dim loss and a dict of detached float32
0-dim metric tensors.

The names are imported on first use: config validation reads :mod:`.names` before torch
starts.
"""

from importlib import import_module

_HOMES = {
    "cegppo_loss": "cegppo", "cegppo_token_loss": "cegppo",
    "ppo_clip_loss": "baselines", "cispo_loss": "baselines", "gspo_loss": "baselines",
    "aggregate_loss": "aggregation", "loss_normalizer": "aggregation",
    "POLICY_LOSSES": "registry", "LOSS_CONFIG_KEYS": "registry", "loss_kwargs": "registry",
    "LOSS_NAMES": "names", "LOSS_AGG_MODES": "names", "LOGPROB_IMPLS": "names",
    "KL_KINDS": "kl", "kl_penalty": "kl",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
