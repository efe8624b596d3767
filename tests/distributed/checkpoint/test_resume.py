"""A run stopped after step k and resumed from its checkpoint continues as if nothing had
happened: every per-step metric and the final weights are bitwise those of the uninterrupted
run (fp32 on the CPU is deterministic, and vLLM samples with per-request seeds), the betas
that the entropy controller moves between steps included."""

from __future__ import annotations

import pytest
import torch

from megatron_cegppo.rewards.registry import register_reward
from megatron_cegppo.testing.multiprocess import run_distributed
from megatron_cegppo.testing.tiny import fit_tiny_trainer, prepare_tiny_run

pytestmark = pytest.mark.distributed

TIMING = ("time/", "tokens_per_second")


@register_reward("test_resume_contains_7")
def contains_7(response: str, answer: str) -> float:
    return float("7" in response)


def worker(rank, world, overrides):
    from megatron_cegppo.models import export_hf_weights

    trainer, history = fit_tiny_trainer(overrides, world)
    final = dict(export_hf_weights(trainer.model, trainer.arch))
    return trainer.start_step, history, final if rank == 0 else None


def _deterministic(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith(TIMING)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    common = prepare_tiny_run(tmp) + [
        "algorithm.prompts_per_step=8", "algorithm.micro_batch_size=8", "rollout.n=4",
        "reward.name=test_resume_contains_7", "optim.warmup_steps=2",
        # the betas moved between steps by the entropy controller, whose state the checkpoint keeps;
        # acting right after its warm-up (the entropy of a few steps never comes down to the band)
        "algorithm.entropy_control.enabled=true", "algorithm.entropy_control.warmup_steps=1",
        "algorithm.entropy_control.target_fraction=0.5", "algorithm.entropy_control.wait_for_band=false"]
    whole = run_distributed(worker, 2, common + [f"trainer.run_dir={tmp / 'whole'}", "trainer.steps=4"])
    return tmp, common, whole


def _stop_and_resume(tmp, common, name, resumed_overrides=(), first_overrides=()):
    first = run_distributed(worker, 2, common + [f"trainer.run_dir={tmp / name}", "trainer.steps=2",
                                                  *first_overrides])
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
    betas = [(m["control/beta1"], m["control/beta2"]) for m in history]
    assert betas[0] == betas[1] == (0.5, 1.0) and betas[2] != betas[1], betas  # moved after the warm-up step


@pytest.mark.parametrize("saved_at", [[], ["parallel.tensor=1", "parallel.pipeline=2"]], ids=["tp2", "pp2"])
def test_resume_at_another_layout(setup, saved_at):
    """Saved at TP=2 (or PP=2), resumed at TP=1 x PP=1 x DP=2: model and optimizer resharded.
    Only the reduction order differs, so metrics agree to 1e-5 instead of bitwise."""
    tmp, common, whole = setup
    name = "_".join(saved_at) or "tp2"
    history, final = _stop_and_resume(tmp, common, name, ["parallel.tensor=1", "parallel.pipeline=1"], saved_at)
    assert len(history) == len(whole[0][1]) == 4
    for got, expected in zip(history, whole[0][1]):
        for key, value in _deterministic(expected).items():
            assert got[key] == pytest.approx(value, abs=1e-5, rel=1e-5), key
    for name, tensor in whole[0][2].items():
        torch.testing.assert_close(final[name], tensor, atol=1e-5, rtol=1e-5, msg=name)


def export_worker(rank, world, overrides, out):
    from megatron_cegppo.cli import main
    from megatron_cegppo.rollout import EngineConfig, RolloutEngine, SamplingConfig

    assert main(["export", "--config", "configs/tiny_cpu.yaml", "--out", out, *overrides]) == 0
    engine = RolloutEngine(out, EngineConfig(max_model_len=32, kv_cache_bytes=8 << 20), seed=0)
    return len(engine.generate([[5, 6]], SamplingConfig(n=2, max_tokens=4), seeds=[1]))


def test_export_writes_a_folder_transformers_and_vllm_load(setup):
    """Saved at TP=2, exported at TP=1 from one process: the HF tensors are the trained ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, common, whole = setup
    out = tmp / "exported"
    overrides = [o for o in common] + [f"trainer.run_dir={tmp / 'whole'}", "parallel.tensor=1"]
    (n,) = run_distributed(export_worker, 1, overrides, str(out), timeout=300)
    assert n == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    for name, tensor in whole[0][2].items():
        assert torch.equal(state[name], tensor), name
    assert AutoTokenizer.from_pretrained(out).decode([4]) == "\\boxed{"


def test_checkpoint_of_another_model_is_refused(setup, tmp_path):
    from transformers import Qwen2ForCausalLM

    from megatron_cegppo.demo.tokenizer import load_task_tokenizer
    from megatron_cegppo.demo.warmup import tiny_qwen2_config

    tmp, common, whole = setup
    other = tmp_path / "other"
    config = tiny_qwen2_config(load_task_tokenizer(str(tmp / "model")))
    config.num_hidden_layers = 4
    config.layer_types = config.layer_types * 2
    Qwen2ForCausalLM(config).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        (other / name).write_bytes((tmp / "model" / name).read_bytes())
    overrides = [o for o in common if not o.startswith("model.path")] + [
        f"model.path={other}", f"trainer.run_dir={tmp / 'whole'}", "trainer.steps=5"]
    with pytest.raises(RuntimeError, match="holds a different model"):
        run_distributed(worker, 2, overrides, timeout=300)


def test_resume_from_an_explicit_checkpoint(setup):
    """``trainer.resume_from`` continues another run's checkpoint in a new run directory."""
    tmp, common, whole = setup
    run_distributed(worker, 2, common + [f"trainer.run_dir={tmp / 'source'}", "trainer.steps=2"])
    ckpt = tmp / "source" / "checkpoints" / "step_00000001"
    run = run_distributed(worker, 2, common + [f"trainer.run_dir={tmp / 'explicit'}", "trainer.steps=4",
                                               f"trainer.resume_from={ckpt}"])
    start, history, _ = run[0]
    assert start == 2
    assert [_deterministic(m) for m in history] == [_deterministic(m) for m in whole[0][1][2:]]


def time_limit_worker(rank, world, overrides, seconds_left):
    import os
    import time

    from megatron_cegppo.trainer.stopping import JOB_END_TIME_ENV

    os.environ[JOB_END_TIME_ENV] = str(time.time() + seconds_left)  # what the batch script exports
    trainer, history = fit_tiny_trainer(overrides, world)
    return getattr(trainer, "stopped_at", None), history


def test_stops_by_itself_before_the_time_limit_and_resumes_exactly(setup):
    """30 s before the job's end, less than one more step and a save need (with Slurm's
    margin): the trainer saves after its step, writes the STOPPED marker with the reason, and
    the restart continues as the uninterrupted run."""
    import json

    from megatron_cegppo.trainer.stopping import STOPPED_MARKER, load_timing

    tmp, common, whole = setup
    run = [f"trainer.run_dir={tmp / 'time_limit'}", "trainer.steps=4"]
    first = run_distributed(time_limit_worker, 2, common + run, 30.0)
    assert [stopped for stopped, _ in first] == [0, 0]
    marker = json.loads((tmp / "time_limit" / STOPPED_MARKER).read_text())
    assert marker["step"] == 0 and "before the job's time limit" in marker["reason"], marker
    timing = load_timing(tmp / "time_limit")
    assert len(timing.step_seconds) == 1 and len(timing.save_seconds) == 1
    rest = run_distributed(worker, 2, common + run)
    assert rest[0][0] == 1
    assert [_deterministic(m) for m in first[0][1] + rest[0][1]] == [_deterministic(m) for m in whole[0][1]]
    assert not (tmp / "time_limit" / STOPPED_MARKER).exists()  # cleared by the start that resumed


def preempted_worker(rank, world, overrides, at_step):
    import os
    import signal

    from megatron_cegppo.trainer.loop import Trainer

    upstream = Trainer.train_step

    def train_step(self, step, timer):
        if step == at_step and rank == 0:  # Slurm's preemption: SIGTERM, SIGKILL after the grace time
            os.kill(os.getpid(), signal.SIGTERM)
        return upstream(self, step, timer)

    Trainer.train_step = train_step
    trainer, history = fit_tiny_trainer(overrides, world)
    return getattr(trainer, "stopped_at", None), history


def test_preempted_step_is_given_up_and_the_previous_state_saved_at_once(setup):
    """SIGTERM during step 1's generation: step 1 is abandoned before its update, the state
    after step 0 is saved right away, and the restart redoes step 1 exactly."""
    import json

    from megatron_cegppo.trainer.stopping import STOPPED_MARKER

    tmp, common, whole = setup
    run = [f"trainer.run_dir={tmp / 'preempted'}", "trainer.steps=4"]
    first = run_distributed(preempted_worker, 2, common + run, 1)
    assert [stopped for stopped, _ in first] == [0, 0] and len(first[0][1]) == 1
    marker = json.loads((tmp / "preempted" / STOPPED_MARKER).read_text())
    assert marker["step"] == 0 and marker["reason"].startswith("preempted: step 1 given up"), marker
    rest = run_distributed(worker, 2, common + run)
    assert rest[0][0] == 1
    assert [_deterministic(m) for m in first[0][1] + rest[0][1]] == [_deterministic(m) for m in whole[0][1]]
    torch.testing.assert_close(rest[0][2], whole[0][2], rtol=0, atol=0)


def test_a_run_directory_whose_checkpoints_all_fail_verification_is_refused(setup):
    """Same-size damage to a shard of every checkpoint: the trainer does not start again from
    the base model without a word; it names each checkpoint and why, unless told to start over."""
    import shutil

    tmp, common, whole = setup
    damaged = tmp / "damaged"
    shutil.copytree(tmp / "same_layout", damaged)
    for ckpt in sorted((damaged / "checkpoints").glob("step_*")):
        shard = max((ckpt / "megatron").glob("*.distcp"), key=lambda p: p.stat().st_size)
        data = bytearray(shard.read_bytes())
        data[len(data) // 2: len(data) // 2 + 4096] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 4096])
        shard.write_bytes(bytes(data))
    run = common + [f"trainer.run_dir={damaged}", "trainer.steps=4"]
    with pytest.raises(RuntimeError, match="no checkpoint can be resumed from") as info:
        run_distributed(worker, 2, run, timeout=300)
    assert "step_00000003" in str(info.value) and "does not match its sha256 digest" in str(info.value)
    started = run_distributed(worker, 2, run[:-1] + ["trainer.steps=1", "trainer.start_over=true"], timeout=300)
    assert started[0][0] == 0


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(setup):
    """Same-size damage to the newest checkpoint (found by the ranks hashing their shares): the
    run resumes from the one before, says so, and continues as the uninterrupted run did."""
    import shutil

    tmp, common, whole = setup
    damaged = tmp / "damaged_latest"
    shutil.copytree(tmp / "same_layout", damaged)
    newest = sorted((damaged / "checkpoints").glob("step_*"))[-1]
    assert newest.name == "step_00000003"
    state = newest / "trainer_state.json"
    text = state.read_text()
    state.write_text(text.replace('"step": 3', '"step": 9'))  # same size
    rest = run_distributed(worker, 2, common + [f"trainer.run_dir={damaged}", "trainer.steps=4"], timeout=300)
    assert rest[0][0] == 2, "did not resume after step 1"
    assert [_deterministic(m) for m in rest[0][1]] == [_deterministic(m) for m in whole[0][1][2:]]
