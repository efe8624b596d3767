"""``megatron-cegppo eval``: k samples per prompt with vLLM, scored by the config's reward."""

from __future__ import annotations

import pytest

from megatron_cegppo.rewards.registry import register_reward
from megatron_cegppo.testing.multiprocess import run_distributed
from megatron_cegppo.testing.tiny import save_tiny_task_model

pytestmark = pytest.mark.distributed


@register_reward("test_eval_contains_1")
def contains_1(response: str, answer: str) -> float:
    return float("1" in response)


def worker(rank, world, model, data):
    from megatron_cegppo.cli import main
    from megatron_cegppo.config import load_config
    from megatron_cegppo.evaluate import evaluate

    overrides = [f"model.path={model}", "reward.name=test_eval_contains_1"]
    from megatron_cegppo.testing.tiny import TINY_CONFIG

    assert main(["eval", "--config", str(TINY_CONFIG), "--data", data, "--k", "3", *overrides]) == 0
    return evaluate(load_config(TINY_CONFIG, overrides), data, k=3)


def test_eval_reports_the_mean_reward_over_k_samples(tmp_path):
    from megatron_cegppo.demo.prepare import write_prompts

    model = tmp_path / "model"
    save_tiny_task_model(model)
    write_prompts(tmp_path / "bench.jsonl", 5, seed=3)
    (result,) = run_distributed(worker, 1, str(model), str(tmp_path / "bench.jsonl"), timeout=300)
    assert result["prompts"] == 5 and result["k"] == 3
    # k samples of every prompt: a sampler that drew 15 of one prompt fails this
    assert sorted(result["prompt_index"]) == [i for i in range(5) for _ in range(3)]
    assert len(result["responses"]) == len(result["rewards"]) == 15
    assert result["rewards"] == [float("1" in r) for r in result["responses"]]
    assert result["accuracy"] == pytest.approx(sum(result["rewards"]) / 15)
