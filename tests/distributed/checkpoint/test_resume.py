"""A run stopped after step k and resumed from its checkpoint continues as if nothing had
happened: every per-step metric and the final weights are bitwise those of the uninterrupted
run (fp32 on the CPU is deterministic, and vLLM samples with per-request seeds)."""

from __future__ import annotations

import pytest
import torch

from megatron_cegppo.rewards.registry import register_reward
from megatron_cegppo.testing.multiprocess import run_distributed
from megatron_cegppo.testing.tiny import save_tiny_task_model

pytestmark = pytest.mark.distributed

TIMING = ("time/", "tokens_per_second")


@register_reward("test_resume_contains_7")
def contains_7(response: str, answer: str) -> float:
    return float("7" in response)


def worker(rank, world, overrides):
    from megatron_cegppo.config import load_config, validate
    from megatron_cegppo.models import export_hf_weights
    from megatron_cegppo.trainer.loop import Trainer

    trainer = Trainer(validate(load_config("configs/tiny_cpu.yaml", overrides), world))
    history = trainer.fit()
    final = dict(export_hf_weights(trainer.model, trainer.arch))
    return trainer.start_step, history, final if rank == 0 else None


def _deterministic(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith(TIMING)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_cegppo.demo.prepare import write_prompts

    tmp = tmp_path_factory.mktemp("resume")
    save_tiny_task_model(tmp / "model")
    write_prompts(tmp / "prompts.jsonl", 64, seed=1)
    common = [f"model.path={tmp / 'model'}", f"data.train_path={tmp / 'prompts.jsonl'}",
              "algorithm.prompts_per_step=8", "algorithm.micro_batch_size=8", "rollout.n=4",
              "reward.name=test_resume_contains_7", "optim.warmup_steps=2"]
    whole = run_distributed(worker, 2, common + [f"trainer.run_dir={tmp / 'whole'}", "trainer.steps=4"])
    return tmp, common, whole


def _stop_and_resume(tmp, common, name, resumed_overrides=()):
    first = run_distributed(worker, 2, common + [f"trainer.run_dir={tmp / name}", "trainer.steps=2"])
    rest = run_distributed(worker, 2, common + [f"trainer.run_dir={tmp / name}", "trainer.steps=4",
                                                 *resumed_overrides])
    assert first[0][0] == 0 and rest[0][0] == 2, "the second run did not resume at step 2"
    return first[0][1] + rest[0][1], rest[0][2]


def test_stopped_and_resumed_run_equals_uninterrupted(setup):
    from megatron_cegppo.tracking.metrics import read_metrics

    tmp, common, whole = setup
    history, final = _stop_and_resume(tmp, common, "same_layout")
    assert [_deterministic(m) for m in history] == [_deterministic(m) for m in whole[0][1]]
    for name, tensor in whole[0][2].items():
        assert torch.equal(final[name], tensor), name
    assert [m["step"] for m in read_metrics(tmp / "same_layout")] == [0, 1, 2, 3]


def test_resume_at_another_layout(setup):
    """Saved at TP=2, resumed at TP=1 x DP=2: model and optimizer resharded. Only the
    reduction order differs, so metrics agree to 1e-5 instead of bitwise."""
    tmp, common, whole = setup
    history, final = _stop_and_resume(tmp, common, "tp2_to_dp2", ["parallel.tensor=1"])
    for got, expected in zip(history, whole[0][1]):
        for key, value in _deterministic(expected).items():
            assert got[key] == pytest.approx(value, abs=1e-5, rel=1e-5), key
    for name, tensor in whole[0][2].items():
        torch.testing.assert_close(final[name], tensor, atol=1e-5, rtol=1e-5, msg=name)
