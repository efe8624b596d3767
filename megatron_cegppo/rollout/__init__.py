"""vLLM generation colocated with Megatron training: engine, weight sync, log-prob mismatch."""

from megatron_cegppo.rollout.engine import Completion, EngineConfig, RolloutEngine, SamplingConfig

__all__ = ["Completion", "EngineConfig", "RolloutEngine", "SamplingConfig"]
