"""Held-out accuracy: avg@k and pass@k of prompt files, sampled with vLLM and scored with the
run's reward. One implementation for `megatron-cegppo eval` and for validation inside a run
(before training and every ``validation.every`` steps, through the training's own engines
after the weight push, each engine sampling its share of the rows).

A problem repeated in a file (the CE-GPPO authors' AIME files hold each of 30 problems 32
times, sampled once per row) counts as one problem sampled that many times more: its avg@k is
the mean over problems of each one's fraction correct (their ``mean@32``), pass@k the
fraction of problems with at least one correct sample."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

from megatron_cegppo.config import Config


@dataclass
class ValidationSet:
    name: str  # the file's stem: the metrics' name
    path: str
    records: list  # {"prompt", "answer"} per row
    token_ids: list  # per row, fitted to the model
    problem: list  # per row: the index of its problem (rows with one prompt share one)
    truncated: int  # rows whose prompt was cut (data.truncation)
    message: str  # one line saying so ("" when none was), for the reporting rank to print


def load_validation_set(cfg: Config, tokenizer: Any, path: str, *, max_tokens: int) -> ValidationSet:
    """``path``'s rows in the training file's layout and keys, each prompt fitted to what the
    model length leaves beside ``max_tokens`` of response."""
    from dataclasses import replace

    from megatron_cegppo.data.prompts import load_prompts, tokenize_prompts

    records = load_prompts(path, prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key)
    limit = replace(cfg, rollout=replace(cfg.rollout, max_tokens=max_tokens))
    fitted = tokenize_prompts(tokenizer, records, limit, source=path)
    ids: dict = {}
    problem = [ids.setdefault(tuple(t), len(ids)) for t in fitted.token_ids]
    stem = os.path.splitext(os.path.basename(path))[0]
    return ValidationSet(stem, path, records, fitted.token_ids, problem, fitted.truncated, fitted.message)


def validation_seed(seed: int, step: int, row: int) -> int:
    """Per row and validation, the same on every rank of a rollout-TP group; apart from the
    training's request seeds."""
    return zlib.crc32(f"validation/{seed}/{step}/{row}".encode()) & 0x7FFFFFFF


def accuracy(problem: Sequence[int], correct: Sequence[Sequence[bool]]) -> tuple[float, float, int]:
    """``(avg@k, pass@k, samples per problem)`` from each row's samples' correctness."""
    by_problem: dict = {}
    for p, row in zip(problem, correct):
        by_problem.setdefault(p, []).extend(bool(c) for c in row)
    if not by_problem:
        raise ValueError("no rows to score")
    samples = [len(v) for v in by_problem.values()]
    avg = sum(sum(v) / len(v) for v in by_problem.values()) / len(by_problem)
    passed = sum(any(v) for v in by_problem.values()) / len(by_problem)
    return avg, passed, min(samples)


@dataclass
class Scored:
    rows: list  # row index of each completion
    texts: list  # this engine's completions' texts
    rewards: list


def sample_and_score(engine, vset: ValidationSet, rows: Sequence[int], sampling, *, reward: str,
                     seed: int, step: int) -> Scored:
    """``sampling.n`` samples of each of ``rows`` (indices into ``vset``), scored."""
    from megatron_cegppo.rewards.registry import compute_rewards

    if not rows:
        return Scored([], [], [])
    completions = engine.generate([vset.token_ids[r] for r in rows], sampling,
                                  [validation_seed(seed, step, r) for r in rows])
    rows_of = [rows[c.prompt_index] for c in completions]
    texts = [c.text for c in completions]
    rewards = compute_rewards(reward, texts, [vset.records[r]["answer"] for r in rows_of])
    return Scored(rows_of, texts, rewards)


def score_rows(vset: ValidationSet, scored_parts: Sequence[Scored], *, k: int, correct_score: float):
    """``(avg@k, pass@k, samples per problem)`` of one set from every engine's scored samples."""
    correct: list = [[] for _ in vset.records]
    for part in scored_parts:
        for row, value in zip(part.rows, part.rewards):
            correct[row].append(value == correct_score)
    if any(len(c) != k for c in correct):
        raise RuntimeError(f"{vset.path}: not every row got its {k} sample(s)")
    return accuracy(vset.problem, correct)


def summarize(vset: ValidationSet, scored_parts: Sequence[Scored], *, k: int, correct_score: float) -> dict:
    """The metrics of one set, named after it."""
    avg, passed, samples = score_rows(vset, scored_parts, k=k, correct_score=correct_score)
    return {f"val/{vset.name}/avg@{samples}": avg, f"val/{vset.name}/pass@{samples}": passed}


def validation_sampling(cfg: Config):
    from megatron_cegppo.rollout import SamplingConfig

    v = cfg.validation
    return SamplingConfig.from_rollout(cfg.rollout, n=v.k, temperature=v.temperature, top_p=v.top_p,
                                       max_tokens=v.max_tokens or cfg.rollout.max_tokens)


def evaluate_file(cfg: Config, data_path: str, *, k: int) -> dict:
    """`megatron-cegppo eval`: one engine on one prompt file."""
    from transformers import AutoTokenizer

    from megatron_cegppo.rewards.registry import reward_correct_score
    from megatron_cegppo.rollout import EngineConfig, RolloutEngine, SamplingConfig

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    r = cfg.rollout
    vset = load_validation_set(cfg, tokenizer, data_path, max_tokens=r.max_tokens)
    if vset.message:
        print(f"[megatron-cegppo] {vset.message}", flush=True)
    engine = RolloutEngine(cfg.model.path, EngineConfig(
        tensor_parallel_size=1, dtype=cfg.model.dtype, max_model_len=r.max_model_len,
        kv_cache_bytes=r.kv_cache_bytes, gpu_memory_utilization=r.gpu_memory_utilization), seed=cfg.trainer.seed)
    sampling = SamplingConfig.from_rollout(r, n=k)
    scored = sample_and_score(engine, vset, list(range(len(vset.records))), sampling, reward=cfg.reward.name,
                              seed=cfg.trainer.seed, step=0)
    avg, passed, samples = score_rows(vset, [scored], k=k, correct_score=reward_correct_score(cfg.reward.name))
    return {"accuracy": avg, "pass": passed, "samples_per_problem": samples, "problems": len(set(vset.problem)),
            "prompts": len(vset.records), "k": k, "truncated_prompts": vset.truncated, "responses": scored.texts,
            "rewards": scored.rewards, "prompt_index": scored.rows}


__all__ = ["ValidationSet", "accuracy", "evaluate_file", "load_validation_set",
           "sample_and_score", "summarize", "validation_seed"]
