"""Process groups and megatron's parallel state for a run, on the platform's backend (NCCL on
GPUs, gloo on the CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
import torch
import torch.distributed as dist

from megatron_cegppo.config import Config
from megatron_cegppo.lifeline import exit_with_launcher
from megatron_cegppo.platform import Platform, init_platform, init_process_group


@dataclass(frozen=True)
class Layout:
    world: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    dp_group: object
    is_last_stage: bool
    rollout_tp: int
    platform: Platform

    @property
    def device(self) -> torch.device:
        return self.platform.device

    @property
    def rollout_group(self) -> int:
        """Index of this rank's vLLM engine group (ranks rollout_tp * g ... share one engine)."""
        return self.rank // self.rollout_tp

    @property
    def rollout_groups(self) -> int:
        return self.world // self.rollout_tp

    @property
    def rollout_leader(self) -> bool:
        return self.rank % self.rollout_tp == 0


def init_distributed(cfg: Config) -> Layout:
    """Starts the default process group from torchrun's environment (a single process without
    one) and megatron's tensor/pipeline/data-parallel groups."""
    exit_with_launcher()  # a rank (and its children) must not outlive torchrun
    platform = init_platform(cfg.trainer.device)  # before megatron is imported
    from megatron.core import parallel_state

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    init_process_group(platform)
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor, pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
    )
    return Layout(
        world=dist.get_world_size(), rank=dist.get_rank(), tp=p.tensor, pp=p.pipeline,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_group=parallel_state.get_data_parallel_group(),
        is_last_stage=parallel_state.is_pipeline_last_stage(),
        rollout_tp=cfg.rollout.tensor_parallel,
        platform=platform,
    )
