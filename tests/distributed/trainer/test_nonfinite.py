"""Nothing is trained from garbage: a mini-batch whose gradients are not finite never reaches
the weights (it is skipped and counted), several in a row stop the run with a message, and no
checkpoint is written from such a run (2 real processes, TP=2)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_cegppo.rewards.registry import register_reward
from megatron_cegppo.testing.multiprocess import run_distributed
from megatron_cegppo.testing.tiny import fit_tiny_trainer, prepare_tiny_run

pytestmark = pytest.mark.distributed


@register_reward("test_nonfinite_contains_1")
def contains_1(response: str, answer: str) -> float:
    return float("1" in response)


def worker(rank, world, overrides, poisoned_calls):
    """The policy loss of the first ``poisoned_calls`` micro-batch calls is nan."""
    from megatron_cegppo.parallel import pipeline_loss
    from megatron_cegppo.trainer.policy_update import NonFiniteError

    upstream, calls = pipeline_loss._policy_loss_func, [0]

    def poisoned(*args, **kwargs):
        loss, metrics = upstream(*args, **kwargs)
        calls[0] += 1
        return (loss * float("nan") if calls[0] <= poisoned_calls else loss), metrics

    pipeline_loss._policy_loss_func = poisoned
    try:
        trainer, history = fit_tiny_trainer(overrides, world)
    except NonFiniteError as exc:
        return {"error": str(exc)}
    finite = all(bool(torch.isfinite(p).all()) for c in trainer.model for p in c.parameters())
    return {"history": history, "finite": finite}


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nonfinite")
    return tmp, prepare_tiny_run(tmp) + [
        "trainer.steps=2", "algorithm.prompts_per_step=8", "rollout.n=4", "algorithm.micro_batch_size=8",
        "reward.name=test_nonfinite_contains_1"]


def test_a_nonfinite_minibatch_is_skipped_and_counted(common):
    tmp, overrides = common
    run_dir = tmp / "skipped"
    # TP2: each rank computes the loss once per micro-batch; the first mini-batch (2 micro-batches) is nan
    out = run_distributed(worker, 2, overrides + [f"trainer.run_dir={run_dir}"], 2)[0]
    assert "error" not in out, out
    assert out["finite"], "non-finite gradients reached the weights"
    assert [h["nonfinite_skipped"] for h in out["history"]] == [1.0, 1.0]
    assert all(math.isfinite(h["grad_norm"]) for h in out["history"])
    assert (run_dir / "checkpoints" / "step_00000001").is_dir()


def test_nonfinite_in_a_row_stops_without_a_checkpoint(common):
    tmp, overrides = common
    run_dir = tmp / "stopped"
    out = run_distributed(worker, 2, overrides + [f"trainer.run_dir={run_dir}", "trainer.max_consecutive_nonfinite=2"],
                          10**6)[0]
    assert "2 mini-batches in a row had non-finite gradients" in out.get("error", ""), out
    assert not list((run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").exists() else True
