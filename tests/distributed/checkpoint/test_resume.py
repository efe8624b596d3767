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


def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path):
    from megatron_cegppo.demo.prepare import write_prompts

    model = tmp_path / "model"
    save_tiny_task_model(model)
    write_prompts(tmp_path / "prompts.jsonl", 64, seed=1)
    common = [f"model.path={model}", f"data.train_path={tmp_path / 'prompts.jsonl'}",
              "algorithm.prompts_per_step=8", "algorithm.micro_batch_size=16", "rollout.n=4",
              "reward.name=test_resume_contains_7", "optim.warmup_steps=2"]
    whole = run_distributed(worker, 2, common + [f"trainer.run_dir={tmp_path / 'a'}", "trainer.steps=4"])
    first = run_distributed(worker, 2, common + [f"trainer.run_dir={tmp_path / 'b'}", "trainer.steps=2"])
    rest = run_distributed(worker, 2, common + [f"trainer.run_dir={tmp_path / 'b'}", "trainer.steps=4"])
    assert first[0][0] == 0 and rest[0][0] == 2, "the second run did not resume at step 2"
    expected = [_deterministic(m) for m in whole[0][1]]
    got = [_deterministic(m) for m in first[0][1] + rest[0][1]]
    assert got == expected
    for name, tensor in whole[0][2].items():
        assert torch.equal(rest[0][2][name], tensor), name
    from megatron_cegppo.tracking.metrics import read_metrics

    assert [m["step"] for m in read_metrics(tmp_path / "b")] == [0, 1, 2, 3]
