"""The Trainer with packed micro-batches (algorithm.max_tokens_per_microbatch) against the same
run unpacked, in 2 real processes (TP=2): the same samples, losses, entropies and gradient
norms step after step, and the token counts in the metrics."""

from __future__ import annotations

import json

import pytest

from megatron_cegppo.rewards.registry import register_reward
from megatron_cegppo.testing.multiprocess import run_distributed
from megatron_cegppo.testing.tiny import fit_tiny_trainer, prepare_tiny_run

pytestmark = pytest.mark.distributed

COMPARED = ("reward_mean", "response_length_mean", "loss", "entropy", "grad_norm", "clipfrac_low", "clipfrac_high",
            "mismatch/abs_max", "tokens/real")


@register_reward("test_packed_contains_3")
def contains_3(response: str, answer: str) -> float:
    return float("3" in response)


def worker(rank, world, overrides):
    _, history = fit_tiny_trainer(overrides, world)
    return history


def test_packed_run_equals_unpacked_run(tmp_path):
    common = prepare_tiny_run(tmp_path) + [
        "trainer.steps=2", "algorithm.prompts_per_step=8", "rollout.n=4", "algorithm.micro_batch_size=4",
        "reward.name=test_packed_contains_3", "algorithm.loss_agg_mode=seq-mean-token-mean"]
    unpacked = run_distributed(worker, 2, common + [f"trainer.run_dir={tmp_path / 'unpacked'}"], timeout=600)[0]
    packed = run_distributed(worker, 2, common + [f"trainer.run_dir={tmp_path / 'packed'}",
                                                  "algorithm.max_tokens_per_microbatch=64"], timeout=600)[0]
    for step, (u, p) in enumerate(zip(unpacked, packed)):
        for key in COMPARED:
            assert p[key] == pytest.approx(u[key], rel=1e-4, abs=1e-5), f"step {step} {key}: {p[key]} vs {u[key]}"
        # the demo's lengths are short and alike: little to gain here (benchmarks/packing_training.py
        # measures long-tailed ones); the counts must still be honest
        for run in (u, p):
            assert run["tokens/computed"] >= run["tokens/real"] > 0
            assert run["tokens/computed_per_real"] == pytest.approx(run["tokens/computed"] / run["tokens/real"])
    logged = json.loads((tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"tokens/real", "tokens/computed", "tokens/computed_per_real", "time/pack"} <= set(logged)
