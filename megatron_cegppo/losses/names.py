"""The names a run chooses its policy loss, aggregation mode and log-prob implementation by.

Imports nothing: the config is validated against these names before torch starts.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["LOSS_NAMES", "LOSS_AGG_MODES", "LOGPROB_IMPLS", "check_choice"]

# the keys of losses.POLICY_LOSSES and of losses.LOSS_CONFIG_KEYS
LOSS_NAMES = ("cegppo", "ppo", "cispo", "gspo")

# see losses.aggregation.aggregate_loss
LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)

# How the last stage gets per-token log-probs (see parallel.vocab_parallel). "fused": from
# the last hidden states and the output weight, chunk by chunk (no [tokens, V/TP] logits);
# "logits": from the output layer's vocab-sharded logits.
LOGPROB_IMPLS = ("fused", "logits")


def check_choice(what: str, value: Any, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices`` (listed in that order)."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {list(choices)}")
