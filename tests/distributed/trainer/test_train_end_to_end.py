"""A few CE-GPPO steps end to end in 2 real processes (training TP=2, one vLLM engine per
process), with a reference-model KL term and in-run validation: metrics are finite, the
weights changed, every step's samples came from the weights pushed after the previous update
(vLLM and Megatron log-probs agree), and validation ran before training and every 2 steps with
each problem counted once however often its file repeats it; rollout dumps hold what was
sampled; the records reach Weights & Biases (offline)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_cegppo.rewards.registry import register_reward
from megatron_cegppo.testing.multiprocess import run_distributed
from megatron_cegppo.testing.tiny import fit_tiny_trainer, prepare_tiny_run

pytestmark = pytest.mark.distributed


@register_reward("test_contains_5")
def contains_5(response: str, answer: str) -> float:
    """An untrained model's random responses get mixed rewards: a learning signal (and a
    user-registered reward on the way). The validation rows' answers (yes / no) decide their
    reward whatever the response: their accuracy is known."""
    if answer in ("yes", "no"):
        return float(answer == "yes")
    return float("5" in response)


# problem "1+1=" three times (right), "2+2=" once (wrong), "3+3=" once (right): avg = pass = 2/3,
# where counting rows would give 4/5
VALIDATION_ROWS = [("1+1=", "yes"), ("2+2=", "no"), ("1+1=", "yes"), ("3+3=", "yes"), ("1+1=", "yes")]


def worker(rank, world, overrides):
    from megatron_cegppo.models import export_hf_weights

    trainer, history = fit_tiny_trainer(overrides, world)
    final = dict(export_hf_weights(trainer.model, trainer.arch))
    return history, final if rank == 0 else None


def test_short_training_run(tmp_path):
    from megatron_cegppo.models import read_hf_state

    model = tmp_path / "model"
    run_dir = tmp_path / "run"
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in VALIDATION_ROWS))
    overrides = prepare_tiny_run(tmp_path) + [
        f"trainer.run_dir={run_dir}", "trainer.steps=3", "algorithm.prompts_per_step=8",
        "algorithm.micro_batch_size=16", "rollout.n=4", "algorithm.max_sampling_rounds=1",
        "reward.name=test_contains_5", "algorithm.kl_coeff=0.01",
        f"validation.datasets=[{held_out}]", "validation.every=2", "validation.k=2",
        "trainer.rollout_dump_every=2", "trainer.rollout_dump_groups=2", "wandb.enabled=true", "wandb.mode=offline"]
    ranks = run_distributed(worker, 2, overrides, timeout=600)
    history, final = ranks[0]
    assert len(history) == 3
    for metrics in history:
        for key in ("reward_mean", "entropy", "response_length_mean", "clipfrac_low", "quadrant/pa_lp_frac",
                    "mismatch/abs_max", "tokens_per_second", "time/generate", "time/train", "kl_ref"):
            assert key in metrics and math.isfinite(metrics[key]), key
        assert metrics["mismatch/abs_max"] < 1e-3, "vLLM sampled from weights other than Megatron's"
    initial = read_hf_state(model)
    changed = [n for n in initial if not torch.equal(initial[n], final[n])]
    assert len(changed) == len(initial), f"unchanged after training: {set(initial) - set(changed)}"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [-1, 0, 1, 2]  # -1: before training
    validated = {line["step"]: line for line in lines if "val/held_out/avg@2" in line}
    assert sorted(validated) == [-1, 1, 2]  # before training, after 2 steps, after the last
    for line in validated.values():
        assert line["val/held_out/avg@2"] == pytest.approx(2 / 3) and line["val/held_out/pass@2"] == pytest.approx(2 / 3)
        assert line["time/validation"] > 0
    assert (run_dir / "config.yaml").exists()
    dumps = sorted(p.name for p in (run_dir / "rollouts").iterdir())
    assert dumps == ["step_00000000.jsonl", "step_00000002.jsonl"], dumps
    for name in dumps:
        rows = [json.loads(line) for line in (run_dir / "rollouts" / name).read_text().splitlines()]
        assert [r["group"] for r in rows] == [0] * 4 + [1] * 4  # 2 groups of rollout.n=4
        for r in rows:  # the reward of the text shown, and vLLM sampled from Megatron's weights
            assert r["reward"] == contains_5(r["response"], "") and r["length"] > 0, r
            assert r["logprob_mismatch_mean"] < 1e-3, r
    (logged,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")  # W&B, offline: one run
    assert b"reward_mean" in logged.read_bytes() and b"val/held_out/avg@2" in logged.read_bytes()
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert plots == ["clipping.png", "entropy.png", "quadrants.png", "reward.png", "validation.png"], plots
    for name in plots:
        assert (run_dir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
