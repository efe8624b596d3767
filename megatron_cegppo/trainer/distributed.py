"""Process groups and megatron's parallel state for a run, on NCCL (GPU) or gloo (CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_cegppo.config import Config


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
    from megatron.core import parallel_state

    from megatron_cegppo.parallel.cpu_compat import apply_cpu_compat

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(minutes=30))
    apply_cpu_compat()
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
    )
