"""Megatron's Adam with a warm-up + constant/cosine learning rate, and gradient clipping."""

from __future__ import annotations

import math

import torch

from megatron_cegppo.config.schema import OptimConfig


def build_optimizer(cfg: OptimConfig, model_chunks, *, bf16: bool):
    """megatron-core's distributed optimizer (Adam; state sharded over data-parallel ranks)
    over the DDP-wrapped chunks, with megatron's gradient clipping; bf16 params keep fp32
    master weights. The chunks must be wrapped with ``use_distributed_optimizer=True``."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.grad_clip, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=True,
    )
    return get_megatron_optimizer(config, list(model_chunks))


def learning_rate(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then constant or cosine to min_lr."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
