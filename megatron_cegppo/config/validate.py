"""Up-front checks of a :class:`Config`: every problem named, before any heavy import.

Each setting is checked on its own first (a range, a choice, finiteness), then the settings
that depend on one another, only where each of those passed on its own: nothing here divides
by a setting that may be zero, and :func:`problems` never raises."""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from typing import Any, Callable, NamedTuple, Optional

from megatron_cegppo.config.errors import ConfigError
from megatron_cegppo.config.schema import (
    DEVICE_SETTINGS, RECOMPUTE_MODES, SHORT_BATCH_MODES, TRUNCATION_MODES, WANDB_MODES, Config,
    training_positions,
)
from megatron_cegppo.losses.names import LOGPROB_IMPLS, LOSS_AGG_MODES, LOSS_NAMES  # torch-free
_SEED_LIMIT = 2**32  # the trainer seeds numpy's global generator, which takes 32 bits


class Rule(NamedTuple):
    """A setting is valid when ``test(value)``; else it "must be ``wanted``"."""

    test: Callable[[Any], bool]
    wanted: str


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def at_least(low: int) -> Rule:
    """An integer >= ``low``."""
    return Rule(lambda v: _is_int(v) and v >= low, f">= {low}")


def no_less(low: float) -> Rule:
    """A number >= ``low``."""
    return Rule(lambda v: _is_number(v) and v >= low, f">= {low:g}")


def above(low: float) -> Rule:
    return Rule(lambda v: _is_number(v) and v > low, f"> {low:g}")


def within(low: float, high: float, *, closed_low: bool, closed_high: bool) -> Rule:
    def test(v: Any) -> bool:
        return (_is_number(v) and (v >= low if closed_low else v > low)
                and (v <= high if closed_high else v < high))

    text = f"in {'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
    return Rule(test, text)


def one_of(choices) -> Rule:
    return Rule(lambda v: v in choices, f"one of {list(choices)}")


def optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.test(v), f"{rule.wanted} when set")


NON_EMPTY = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
STRINGS = Rule(lambda v: isinstance(v, list) and all(isinstance(s, str) and s for s in v),
               "a list of non-empty strings")
PROBABILITY = within(0, 1, closed_low=False, closed_high=True)
FRACTION = within(0, 1, closed_low=True, closed_high=False)

# every setting with a range or a set of choices; model.path and data.train_path are
# checked apart (their message says what they are)
RULES: dict[str, Rule] = {
    "model.dtype": one_of(("float32", "bfloat16")),
    "model.logprob_impl": one_of(LOGPROB_IMPLS),
    "parallel.tensor": at_least(1),
    "parallel.pipeline": at_least(1),
    "parallel.virtual_pipeline": optional(at_least(2)),
    "parallel.recompute": one_of(RECOMPUTE_MODES),
    "rollout.tensor_parallel": at_least(1),
    "rollout.n": at_least(1),
    "rollout.temperature": above(0),
    "rollout.top_p": PROBABILITY,
    "rollout.max_tokens": at_least(1),
    "rollout.stop": STRINGS,
    "validation.datasets": STRINGS,
    "wandb.project": NON_EMPTY,
    "wandb.name": optional(NON_EMPTY),
    "wandb.tags": STRINGS,
    "wandb.mode": one_of(WANDB_MODES),
    "trainer.rollout_dump_every": at_least(0),
    "trainer.rollout_dump_groups": at_least(1),
    "trainer.rollout_dump_max_bytes": at_least(1024),
    "validation.every": at_least(0),
    "validation.k": at_least(1),
    "validation.temperature": above(0),
    "validation.top_p": PROBABILITY,
    "validation.max_tokens": optional(at_least(1)),
    "rollout.max_model_len": at_least(1),
    "rollout.kv_cache_bytes": at_least(1),
    "rollout.gpu_memory_utilization": PROBABILITY,
    "rollout.weight_bucket_bytes": at_least(1),
    "data.prompt_key": NON_EMPTY,
    "data.answer_key": NON_EMPTY,
    "data.max_prompt_tokens": optional(at_least(1)),
    "data.truncation": one_of(TRUNCATION_MODES),
    "reward.name": NON_EMPTY,
    "algorithm.loss": one_of(LOSS_NAMES),
    "algorithm.eps_low": FRACTION,
    "algorithm.eps_high": no_less(0),
    "algorithm.beta1": no_less(0),
    "algorithm.beta2": no_less(0),
    "algorithm.clip_ratio_c": above(1),
    "algorithm.loss_agg_mode": one_of(LOSS_AGG_MODES),
    "algorithm.max_sampling_rounds": at_least(1),
    "algorithm.prompts_per_step": at_least(1),
    "algorithm.prompts_per_round": optional(at_least(1)),
    "algorithm.short_batch": one_of(SHORT_BATCH_MODES),
    "algorithm.minibatches": at_least(1),
    "algorithm.epochs": at_least(1),
    "algorithm.micro_batch_size": at_least(1),
    "algorithm.max_tokens_per_microbatch": optional(at_least(1)),
    "algorithm.entropy_coeff": no_less(0),
    "algorithm.kl_coeff": no_less(0),
    "algorithm.positive_loss_coeff": no_less(0),
    "algorithm.tis_cap": optional(above(0)),
    "algorithm.entropy_control.target": no_less(0),
    "algorithm.entropy_control.target_fraction": above(0),
    "algorithm.entropy_control.band": FRACTION,
    "algorithm.entropy_control.warmup_steps": at_least(1),
    "algorithm.entropy_control.kp": no_less(0),
    "algorithm.entropy_control.ki": no_less(0),
    "algorithm.entropy_control.smoothing": FRACTION,
    "algorithm.entropy_control.beta1_min": above(0),
    "algorithm.entropy_control.beta1_max": above(0),
    "algorithm.entropy_control.beta2_min": above(0),
    "algorithm.entropy_control.beta2_max": above(0),
    "optim.lr": above(0),
    "optim.min_lr": no_less(0),
    "optim.schedule": one_of(("constant", "cosine")),
    "optim.warmup_steps": at_least(0),
    "optim.weight_decay": no_less(0),
    "optim.adam_beta1": FRACTION,
    "optim.adam_beta2": FRACTION,
    "optim.adam_eps": above(0),
    "optim.grad_clip": no_less(0),
    "trainer.steps": at_least(1),
    "trainer.seed": Rule(lambda v: _is_int(v) and 0 <= v < _SEED_LIMIT, f"in [0, {_SEED_LIMIT - 1}]"),
    "trainer.run_dir": NON_EMPTY,
    "trainer.log_every": at_least(1),
    "trainer.save_every": at_least(0),
    "trainer.keep_checkpoints": at_least(1),
    "trainer.resume_from": optional(NON_EMPTY),
    "trainer.device": one_of(DEVICE_SETTINGS),
    "trainer.max_consecutive_nonfinite": at_least(1),
    "cluster.nodes": at_least(1),
    "cluster.gpus_per_node": at_least(0),
    "cluster.gpu_memory_gib": above(0),
}


def setting_problem(key: str, value: Any) -> Optional[str]:
    """The problem of one setting on its own (``optim.lr``, ``inf``), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        # optim.lr=inf would train from step 0 into non-finite weights
        return f"{key} must be a finite number, got {value}"
    rule = RULES.get(key)
    if rule is None:
        return None
    try:
        ok = rule.test(value)
    except TypeError:  # a value of another type, set by code rather than by the loader
        ok = False
    return None if ok else f"{key} must be {rule.wanted}, got {value!r}"


def _settings(section, prefix: str = ""):
    """(dotted key, value) of every setting, in sections and their subsections."""
    for f in fields(section):
        value = getattr(section, f.name)
        if is_dataclass(value):
            yield from _settings(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def problems(cfg: Config, world_size: Optional[int] = None, *, train_data: bool = True) -> list[str]:
    """Every problem found (empty: valid)."""
    out = []
    if not cfg.model.path:
        out.append("model.path: the HF folder of the starting weights is required")
    if train_data and not cfg.data.train_path:  # eval reads its own prompt file instead
        out.append("data.train_path: a JSONL or parquet file of prompts is required")
    bad = set()
    for key, value in _settings(cfg):
        problem = setting_problem(key, value)
        if problem:
            bad.add(key)
            out.append(problem)

    def ok(*keys: str) -> bool:  # settings that depend on one another: checked when each is valid
        return not bad.intersection(keys)

    out.extend(_parallel_problems(cfg, ok))
    out.extend(_length_problems(cfg, ok))
    out.extend(_batch_problems(cfg, ok))
    out.extend(_entropy_control_problems(cfg, ok))
    if ok("optim.lr", "optim.min_lr") and cfg.optim.min_lr > cfg.optim.lr:
        out.append(f"optim.min_lr ({cfg.optim.min_lr}) must be <= optim.lr ({cfg.optim.lr})")
    if world_size is not None:
        out.extend(_world_problems(cfg, world_size, ok))
    return out


def _parallel_problems(cfg: Config, ok) -> list[str]:
    p, out = cfg.parallel, []
    if ok("parallel.virtual_pipeline", "parallel.pipeline") and p.virtual_pipeline is not None and p.pipeline < 2:
        out.append(f"parallel.virtual_pipeline ({p.virtual_pipeline}) needs parallel.pipeline >= 2, "
                   f"got {p.pipeline}")
    if ok("parallel.tensor") and p.sequence_parallel and p.tensor <= 1:
        out.append("parallel.sequence_parallel needs parallel.tensor > 1")
    return out


def _length_problems(cfg: Config, ok) -> list[str]:
    """Prompt and response lengths against the model length."""
    r, d, out = cfg.rollout, cfg.data, []
    if ok("rollout.max_tokens", "rollout.max_model_len") and r.max_model_len <= r.max_tokens:
        out.append(f"rollout.max_model_len ({r.max_model_len}) must exceed rollout.max_tokens ({r.max_tokens}): "
                   "a prompt needs at least one position")
    v = cfg.validation
    if (ok("validation.max_tokens", "rollout.max_model_len") and v.max_tokens is not None
            and r.max_model_len <= v.max_tokens):
        out.append(f"rollout.max_model_len ({r.max_model_len}) must exceed validation.max_tokens ({v.max_tokens}): "
                   "the engines that train validate too")
    if (ok("data.max_prompt_tokens", "rollout.max_model_len") and d.max_prompt_tokens is not None
            and d.max_prompt_tokens >= r.max_model_len):
        out.append(f"data.max_prompt_tokens ({d.max_prompt_tokens}) must be < rollout.max_model_len "
                   f"({r.max_model_len}): a response needs at least one position")
    budget = cfg.algorithm.max_tokens_per_microbatch
    lengths_ok = ok("rollout.max_model_len", "rollout.max_tokens", "data.max_prompt_tokens")
    longest = training_positions(cfg) if lengths_ok else None
    if ok("algorithm.max_tokens_per_microbatch") and budget is not None and longest is not None and budget < longest:
        limit = (f"rollout.max_model_len - 1 = {r.max_model_len - 1}" if longest == r.max_model_len - 1 else
                 f"data.max_prompt_tokens + rollout.max_tokens - 1 = {longest}")
        out.append(f"algorithm.max_tokens_per_microbatch={budget} is shorter than the longest sequence: a prompt "
                   f"and its response take up to {limit} positions "
                   f"(rollout.max_tokens={r.max_tokens} of them the response), and a sequence is never split")
    return out


def _batch_problems(cfg: Config, ok) -> list[str]:
    a, r, out = cfg.algorithm, cfg.rollout, []
    if ok("rollout.n") and a.dynamic_sampling and r.n < 2:
        out.append(f"rollout.n must be >= 2 for group advantages (algorithm.dynamic_sampling), got {r.n}")
    if ok("algorithm.prompts_per_step", "algorithm.minibatches") and a.prompts_per_step % a.minibatches:
        out.append(f"algorithm.prompts_per_step {a.prompts_per_step} must divide into {a.minibatches} mini-batches")
    elif (ok("algorithm.prompts_per_step", "algorithm.minibatches", "algorithm.prompts_per_round")
          and a.prompts_per_round is not None and a.prompts_per_round < a.prompts_per_step // a.minibatches):
        out.append(f"algorithm.prompts_per_round={a.prompts_per_round} is less than one mini-batch of "
                   f"{a.prompts_per_step // a.minibatches} groups (algorithm.prompts_per_step / minibatches)")
    return out


def _entropy_control_problems(cfg: Config, ok) -> list[str]:
    a, c = cfg.algorithm, cfg.algorithm.entropy_control
    if not c.enabled:
        return []
    out = []
    if ok("algorithm.loss") and a.loss != "cegppo":
        out.append(f"algorithm.entropy_control moves beta1 and beta2, which only algorithm.loss=cegppo has "
                   f"(got {a.loss!r})")
    for beta in ("beta1", "beta2"):
        low, high = f"{beta}_min", f"{beta}_max"
        lo, hi, value = getattr(c, low), getattr(c, high), getattr(a, beta)
        if not ok(f"algorithm.entropy_control.{low}", f"algorithm.entropy_control.{high}"):
            continue
        if lo > hi:
            out.append(f"algorithm.entropy_control: {low} ({lo}) must be <= {high} ({hi})")
        elif ok(f"algorithm.{beta}") and not lo <= value <= hi:
            out.append(f"algorithm.entropy_control: algorithm.{beta} ({value}) must lie within "
                       f"[{low}, {high}] = [{lo}, {hi}] (it is moved in log space)")
    if ok("algorithm.entropy_control.kp", "algorithm.entropy_control.ki") and c.kp == c.ki == 0:
        out.append("algorithm.entropy_control: kp and ki are both 0 (the betas would never move)")
    return out


def _world_problems(cfg: Config, world_size: Any, ok) -> list[str]:
    """The layout and the batch split at ``world_size`` processes."""
    p, a, r = cfg.parallel, cfg.algorithm, cfg.rollout
    if not _is_int(world_size) or world_size < 1:
        return [f"world size must be >= 1, got {world_size!r}"]
    out = []
    model = p.tensor * p.pipeline if ok("parallel.tensor", "parallel.pipeline") else None
    if model is not None and world_size % model:
        out.append(f"world size {world_size} is not a multiple of tensor x pipeline = {model}")
    if ok("rollout.tensor_parallel") and world_size % r.tensor_parallel:
        out.append(f"world size {world_size} is not a multiple of rollout.tensor_parallel = {r.tensor_parallel}")
    keys = ("algorithm.prompts_per_step", "algorithm.minibatches", "algorithm.micro_batch_size", "rollout.n",
            "algorithm.max_tokens_per_microbatch")
    if model is None or world_size % model or not ok(*keys):
        return out
    dp = world_size // model
    per_rank = a.prompts_per_step * r.n // a.minibatches
    if per_rank < dp:
        out.append(f"a mini-batch of {per_rank} sequences cannot give each of {dp} data-parallel rank(s) one")
    if a.max_tokens_per_microbatch is None and (per_rank % dp or (per_rank // dp) % a.micro_batch_size):
        out.append(f"a mini-batch of {per_rank} sequences must split over {dp} data-parallel rank(s) into "
                   f"micro-batches of algorithm.micro_batch_size={a.micro_batch_size}")
    return out


def validate(cfg: Config, world_size: Optional[int] = None) -> Config:
    found = problems(cfg, world_size)
    if found:
        raise ConfigError.of(found)
    return cfg
