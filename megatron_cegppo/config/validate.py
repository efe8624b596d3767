"""Up-front checks of a :class:`Config`: every problem named, before any heavy import."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Optional

from megatron_cegppo.config.loader import ConfigError
from megatron_cegppo.config.schema import DEVICE_SETTINGS, RECOMPUTE_MODES, Config

_LOSSES = ("cegppo", "ppo", "cispo", "gspo")
_AGG = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def problems(cfg: Config, world_size: Optional[int] = None) -> list[str]:
    """Every problem found (empty: valid)."""
    out = []
    p, a, r, o, t = cfg.parallel, cfg.algorithm, cfg.rollout, cfg.optim, cfg.trainer

    def need(ok: bool, message: str) -> None:
        if not ok:
            out.append(message)

    need(bool(cfg.model.path), "model.path: the HF folder of the starting weights is required")
    need(cfg.model.dtype in ("float32", "bfloat16"), f"model.dtype must be float32 or bfloat16, got {cfg.model.dtype!r}")
    need(cfg.model.logprob_impl in ("fused", "logits"), f"model.logprob_impl must be fused or logits, got {cfg.model.logprob_impl!r}")
    need(bool(cfg.data.train_path), "data.train_path: a JSONL or parquet file of prompts is required")
    for name in ("tensor", "pipeline"):
        need(getattr(p, name) >= 1, f"parallel.{name} must be >= 1")
    need(p.virtual_pipeline is None or (p.virtual_pipeline >= 2 and p.pipeline >= 2),
         "parallel.virtual_pipeline needs parallel.pipeline >= 2 and is >= 2 when set")
    need(p.recompute in RECOMPUTE_MODES,
         f"parallel.recompute must be none, selective or full, got {p.recompute!r}")
    need(not p.sequence_parallel or p.tensor > 1, "parallel.sequence_parallel needs parallel.tensor > 1")
    if world_size is not None and p.tensor >= 1 and p.pipeline >= 1:
        need(world_size % (p.tensor * p.pipeline) == 0,
             f"world size {world_size} is not a multiple of tensor x pipeline = {p.tensor * p.pipeline}")
        need(world_size % r.tensor_parallel == 0,
             f"world size {world_size} is not a multiple of rollout.tensor_parallel = {r.tensor_parallel}")
    need(r.n >= 2 or not a.dynamic_sampling, "rollout.n must be >= 2 for group advantages")
    need(r.n >= 1, "rollout.n must be >= 1")
    need(r.temperature > 0, f"rollout.temperature must be > 0, got {r.temperature}")
    need(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}")
    need(r.max_tokens >= 1 and r.max_model_len > r.max_tokens, "rollout.max_model_len must exceed rollout.max_tokens >= 1")
    need(a.loss in _LOSSES, f"algorithm.loss {a.loss!r} is not one of {list(_LOSSES)}")
    need(a.loss_agg_mode in _AGG, f"algorithm.loss_agg_mode {a.loss_agg_mode!r} is not one of {list(_AGG)}")
    need(a.beta1 >= 0 and a.beta2 >= 0, f"algorithm.beta1/beta2 must be >= 0, got {a.beta1}/{a.beta2}")
    need(a.clip_ratio_c > 1, f"algorithm.clip_ratio_c must be > 1, got {a.clip_ratio_c}")
    need(0 <= a.eps_low < 1 and a.eps_high >= 0, "algorithm.eps_low must be in [0, 1) and eps_high >= 0")
    need(a.tis_cap is None or a.tis_cap > 0, "algorithm.tis_cap must be > 0 when set")
    need(a.kl_coeff >= 0 and a.entropy_coeff >= 0, "algorithm.kl_coeff and entropy_coeff must be >= 0")
    need(a.prompts_per_step >= 1 and a.minibatches >= 1 and a.epochs >= 1 and a.micro_batch_size >= 1,
         "algorithm.prompts_per_step, minibatches, epochs and micro_batch_size must be >= 1")
    need(a.max_sampling_rounds >= 1, "algorithm.max_sampling_rounds must be >= 1")
    need(a.prompts_per_step % a.minibatches == 0,
         f"algorithm.prompts_per_step {a.prompts_per_step} must divide into {a.minibatches} mini-batches")
    budget = a.max_tokens_per_microbatch
    need(budget is None or budget >= r.max_model_len - 1,
         f"algorithm.max_tokens_per_microbatch={budget} is shorter than the longest sequence: a prompt and its "
         f"response take up to rollout.max_model_len - 1 = {r.max_model_len - 1} positions "
         f"(rollout.max_tokens={r.max_tokens} of them the response), and a sequence is never split")
    if world_size is not None and p.tensor * p.pipeline >= 1 and world_size % (p.tensor * p.pipeline) == 0:
        dp = world_size // (p.tensor * p.pipeline)
        per_rank = a.prompts_per_step * r.n // a.minibatches
        need(per_rank >= dp, f"a mini-batch of {per_rank} sequences cannot give each of {dp} data-parallel "
                             "rank(s) one")
        need(budget is not None or (per_rank % dp == 0 and (per_rank // dp) % a.micro_batch_size == 0),
             f"a mini-batch of {per_rank} sequences must split over {dp} data-parallel rank(s) into "
             f"micro-batches of algorithm.micro_batch_size={a.micro_batch_size}")
    need(o.lr > 0 and o.min_lr >= 0, "optim.lr must be > 0 and optim.min_lr >= 0")
    need(o.schedule in ("constant", "cosine"), f"optim.schedule must be constant or cosine, got {o.schedule!r}")
    need(o.warmup_steps >= 0 and o.grad_clip >= 0, "optim.warmup_steps and optim.grad_clip must be >= 0")
    need(t.steps >= 1, "trainer.steps must be >= 1")
    need(t.keep_checkpoints >= 1, "trainer.keep_checkpoints must be >= 1")
    need(t.max_consecutive_nonfinite >= 1, "trainer.max_consecutive_nonfinite must be >= 1")
    out.extend(_non_finite(cfg))
    need(t.device in DEVICE_SETTINGS, f"trainer.device must be one of {list(DEVICE_SETTINGS)}, got {t.device!r}")
    c = cfg.cluster
    need(c.nodes >= 1 and c.gpus_per_node >= 0 and c.gpu_memory_gib > 0,
         "cluster.nodes must be >= 1, cluster.gpus_per_node >= 0 and cluster.gpu_memory_gib > 0")
    return out


def _non_finite(cfg: Config) -> list[str]:
    """Every float setting that is nan or infinite (``optim.lr=inf`` would train from step 0
    into non-finite weights)."""
    out = []
    for section in fields(cfg):
        values = getattr(cfg, section.name)
        for f in fields(values):
            value = getattr(values, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                out.append(f"{section.name}.{f.name} must be a finite number, got {value}")
    return out


def validate(cfg: Config, world_size: Optional[int] = None) -> Config:
    found = problems(cfg, world_size)
    if found:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(found))
    return cfg
