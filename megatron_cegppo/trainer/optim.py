"""Megatron's Adam with a warm-up + constant/cosine learning rate, and gradient clipping."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_cegppo.config.schema import OptimConfig


def build_optimizer(cfg: OptimConfig, model_chunks, *, bf16: bool):
    """megatron-core's optimizer over the DDP-wrapped chunks. On a GPU: the distributed
    optimizer, bf16 params with fp32 master weights, megatron's own clipping. On the CPU:
    plain fp32 Adam (megatron's clipping and distributed optimizer assume CUDA tensors), and
    :func:`clip_grad_norm_` clips."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    on_gpu = torch.cuda.is_available()
    config = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.grad_clip if on_gpu else 0.0, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=on_gpu,
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


@torch.no_grad()
def clip_grad_norm_(model_chunks, max_norm: float) -> float:
    """The global L2 norm of the gradients (``main_grad``) over the whole model, counting each
    tensor-parallel duplicate and the tied embedding's pipeline copy once, and scaling them down to ``max_norm`` when above it."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    grads, own = [], []
    for chunk in model_chunks:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                continue
            grads.append(g)
            if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p):
                own.append(g)
    total = torch.zeros((), dtype=torch.float64)
    for g in own:
        total += g.double().pow(2).sum().cpu()
    if dist.is_initialized():
        dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    norm = float(total.sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(scale)
    return norm
