"""Process groups and megatron's parallel state for a run. They are set up by the platform
module (:mod:`megatron_cegppo.platform`), which the export shares; the trainer's names stay
here."""

from megatron_cegppo.platform import Layout, init_distributed

__all__ = ["Layout", "init_distributed"]
