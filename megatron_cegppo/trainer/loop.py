"""The CE-GPPO run, as a table of contents. Start (:class:`Trainer`): process groups, the run
directory's lock, prompts, the vLLM engine, the policy, resume, the first weight push. One
step (:meth:`Trainer.train_step`): generate and score, advantages, pack, recompute log-probs,
update, push the weights into vLLM. The run (:meth:`Trainer.fit`): steps, metrics, saves, and
the stop (a request, a time limit, a preemption)."""

from __future__ import annotations

import random
import time

import numpy as np
import torch

from megatron_cegppo.config import Config, to_dict
from megatron_cegppo.config.errors import ConfigError
from megatron_cegppo.trainer.checkpointing import TrainerCheckpoints
from megatron_cegppo.trainer.collectives import barrier
from megatron_cegppo.trainer.distributed import Layout, init_distributed
from megatron_cegppo.trainer.entropy_steering import EntropySteering
from megatron_cegppo.trainer.policy import build_policy
from megatron_cegppo.trainer.policy_update import NonFiniteError, PolicyUpdate
from megatron_cegppo.trainer.run_directory import lock_run_dir, prepare_for_start
from megatron_cegppo.trainer.step_metrics import step_metrics
from megatron_cegppo.trainer.step_phases import (
    StepRollout, compute_advantages, groups_per_minibatch, pack_minibatches, recompute_log_probs,
)
from megatron_cegppo.trainer.stop_requests import StepAbandoned, StopRequests
from megatron_cegppo.trainer.stopping import StopClock, load_timing, save_timing, write_stopped_marker

__all__ = ["NonFiniteError", "StepAbandoned", "StepRollout", "Trainer", "train"]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_packing_dtype(cfg: Config, layout: Layout) -> None:
    if (cfg.algorithm.max_tokens_per_microbatch and layout.platform.packed_attention == "thd"
            and cfg.model.dtype != "bfloat16"):
        # flash and fused attention, the backends of THD, take 16-bit inputs only
        raise ConfigError("packed micro-batches (algorithm.max_tokens_per_microbatch) use transformer-engine's "
                          "THD attention, which needs model.dtype=bfloat16")


class Trainer:
    def __init__(self, cfg: Config, engine=None):
        """``engine``: the rollout engine to use instead of starting vLLM (anything with
        ``generate``, ``push_weights``, ``sleep`` and ``wake_up``, such as
        :class:`megatron_cegppo.rollout.replay.ReplayEngine`)."""
        from transformers import AutoTokenizer

        from megatron_cegppo.data.prompts import load_training_prompts
        from megatron_cegppo.data.sampler import ShuffledSampler
        from megatron_cegppo.rewards.registry import reward_correct_score
        from megatron_cegppo.rollout.engine import SamplingConfig
        from megatron_cegppo.trainer.rollout_phase import RolloutPhase, start_engine
        from megatron_cegppo.trainer.validation_phase import InRunValidation

        self.cfg = cfg
        self.layout: Layout = init_distributed(cfg)
        _check_packing_dtype(cfg, self.layout)
        self.reporting = self.layout.rank == 0
        self.run_lock = lock_run_dir(self.layout, cfg.trainer.run_dir)
        _seed_everything(cfg.trainer.seed)

        # the prompts
        self.tokenizer = tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.prompts, cut = load_training_prompts(cfg, tokenizer)
        if cut and self.reporting:
            print(f"[megatron-cegppo] {cut}", flush=True)
        self.sampler = ShuffledSampler(len(self.prompts), seed=cfg.trainer.seed, shuffle=cfg.data.shuffle)

        # generation: the engine first, as vLLM reseeds the global RNG (megatron's is seeded after)
        self.engine = engine if engine is not None else start_engine(cfg.model, cfg.rollout, seed=cfg.trainer.seed)
        self.sampling = SamplingConfig.from_rollout(cfg.rollout)
        self.correct_score = reward_correct_score(cfg.reward.name)
        self.rollout = RolloutPhase(self.engine, self.layout, self.prompts, reward=cfg.reward.name,
                                    sampling=self.sampling, seed=cfg.trainer.seed)
        self.validation = InRunValidation(cfg, tokenizer, self.layout, self.engine, correct_score=self.correct_score)

        # the policy and its update
        self.policy = build_policy(cfg.model, cfg.parallel, cfg.algorithm, cfg.optim,
                                   temperature=cfg.rollout.temperature, seed=cfg.trainer.seed)
        self.update = PolicyUpdate(cfg.optim, cfg.algorithm, self.layout, total_steps=cfg.trainer.steps,
                                   max_consecutive_nonfinite=cfg.trainer.max_consecutive_nonfinite,
                                   reporting=self.reporting)

        # resume
        self.checkpoints = TrainerCheckpoints(cfg.trainer, self.layout)
        resumed = self.checkpoints.resume(self.policy, self.sampler, config=to_dict(cfg))
        self.start_step = resumed.step + 1 if resumed else 0
        if resumed:
            self.update.optimizer_steps = resumed.optimizer_steps
        self.steering = EntropySteering.of(cfg.algorithm, resumed.extra if resumed else {})
        self.stops = StopRequests(self.layout, cfg.trainer.run_dir)
        self.push_weights()

    # the policy's parts, by the names the tests and benchmarks read
    @property
    def model(self) -> list:
        return self.policy.model

    @property
    def arch(self):
        return self.policy.arch

    @property
    def reference(self):
        return self.policy.reference

    @property
    def optimizer(self):
        return self.policy.optimizer

    # -- one step ---------------------------------------------------------------------------

    def train_step(self, step: int, timer) -> dict:
        """One RL step, phase by phase."""
        a, L = self.cfg.algorithm, self.layout
        with timer.phase("generate"):  # each response scored as it comes, for dynamic sampling
            groups, seen_rewards, sampling_stats = self.rollout.collect(
                self.sampler, step=step, num_prompts=a.prompts_per_step, dynamic=a.dynamic_sampling,
                max_rounds=a.max_sampling_rounds, per_round=a.prompts_per_round,
                shrink_to=groups_per_minibatch(a) if a.short_batch == "shrink" else None)
            self.engine.sleep()  # GPU: frees vLLM's memory for training; a no-op on the CPU
        self.stops.abandon_if_preempted(step)
        with timer.phase("advantages"):
            rollout = compute_advantages(groups, group_size=self.sampling.n, algorithm=a, layout=L,
                                         correct_score=self.correct_score)
        with timer.phase("pack"):
            minibatches = pack_minibatches(rollout, algorithm=a, layout=L, pad_id=self.pad_id,
                                           virtual_pipeline=bool(self.cfg.parallel.virtual_pipeline))
        with timer.phase("old_log_prob"):
            mismatch = recompute_log_probs(self.policy, minibatches, algorithm=a, layout=L)
        t = self.cfg.trainer
        if t.rollout_dump_every and step % t.rollout_dump_every == 0:
            with timer.phase("rollout_dump"):
                self._dump_rollouts(step, rollout, minibatches)
        self.stops.abandon_if_preempted(step)  # the last point before the weights change
        steered = self.steering.apply(self.policy) if self.steering else {}
        with timer.phase("train"):
            update = self.update(self.policy, minibatches)
        with timer.phase("weight_sync"):
            self.push_weights()
        metrics = step_metrics(L, rollout, minibatches, update, mismatch=mismatch, seen_rewards=seen_rewards,
                            sampling_stats=sampling_stats, lr=self.optimizer.param_groups[0]["lr"],
                            nonfinite_skipped=self.update.nonfinite_skipped,
                            forward_passes=1 + (self.reference is not None) + a.epochs,
                            correct_score=self.correct_score)
        if self.steering:  # the betas this step trained with, and the next step's from its entropy
            metrics.update(steered)
            metrics.update(self.steering.observe(metrics.get("entropy", float("nan"))))
        return metrics

    def _dump_rollouts(self, step: int, rollout, minibatches) -> None:
        from megatron_cegppo.tracking.rollout_dump import write_rollout_dump
        from megatron_cegppo.trainer.rollout_dumps import rollout_dump_rows, sequence_mismatch

        t = self.cfg.trainer
        per_response = sequence_mismatch(self.layout, minibatches)  # every rank: a collective
        if self.reporting:
            rows = rollout_dump_rows(rollout, per_response, self.tokenizer, groups=t.rollout_dump_groups,
                                     group_size=self.sampling.n)
            write_rollout_dump(t.run_dir, step, rows, max_bytes=t.rollout_dump_max_bytes)

    def push_weights(self) -> None:
        """Megatron's weights into vLLM, bucket by bucket."""
        from megatron_cegppo.rollout.weight_sync import push_megatron_weights

        push_megatron_weights(self.engine, self.model, self.arch, bucket_bytes=self.cfg.rollout.weight_bucket_bytes)

    def save(self, step: int) -> None:
        """The state after ``step``, atomically (every rank calls it)."""
        self.checkpoints.save(step, self.policy, sampler=self.sampler, optimizer_steps=self.update.optimizer_steps,
                              config=to_dict(self.cfg), extra=self.steering.extra_state() if self.steering else None)

    # -- the run ----------------------------------------------------------------------------

    def fit(self) -> list[dict]:
        """Steps from :attr:`start_step` to ``trainer.steps``, or until a stop; the metrics of
        the steps run."""
        from megatron_cegppo.checkpoint.rng import capture_rng_state, restore_rng_state
        from megatron_cegppo.tracking.metrics import MetricsWriter
        from megatron_cegppo.tracking.plots import plot_run
        from megatron_cegppo.tracking.progress import PhaseTimer, progress

        t = self.cfg.trainer
        if self.reporting:
            prepare_for_start(t.run_dir, to_dict(self.cfg), fresh=self.start_step == 0,
                              allow_config_change=t.allow_config_change)
        barrier(self.layout)
        # a resumed run drops the records of the steps it runs again; a fresh one starts empty
        writer = MetricsWriter(t.run_dir, enabled=self.reporting, truncate_after_step=self.start_step - 1,
                               wandb=self._wandb_factory())
        # the job's end time (from the batch script) against the step and save times measured
        # so far, in this start and the previous ones
        self.stops.clock = clock = StopClock.from_env(measured=load_timing(t.run_dir))
        warning = clock.lead_warning()
        if warning and self.reporting:
            print(f"[megatron-cegppo] warning: {warning}", flush=True)
        self.stops.install()
        timer, history = PhaseTimer(), []
        bar = progress(t.steps, desc="CE-GPPO steps", enabled=self.reporting, initial=self.start_step)
        try:
            if self.start_step == 0 and self.validation.due(0, last=False):
                writer.log(-1, self._validate(0))  # the record "before training"
            for step in range(self.start_step, t.steps):
                timer.reset()
                start = time.perf_counter()
                at_start = (self.sampler.state_dict(), capture_rng_state())
                try:
                    metrics = self.train_step(step, timer)
                except StepAbandoned:  # preempted: the step's rollouts are lost, nothing else
                    self.sampler.load_state_dict(at_start[0])
                    restore_rng_state(at_start[1])
                    if self.checkpoints.last_saved_step != step - 1:  # nothing to save before the first step
                        self.save(step - 1)
                    reason = f"preempted: step {step} given up before its update"
                    self._stopped(step - 1, reason, f"{reason}; the state after step {step - 1} is saved")
                    break
                elapsed = time.perf_counter() - start
                metrics.update(timer.summary())
                metrics["time/step"] = elapsed
                metrics["tokens_per_second"] = metrics.pop("tokens") / elapsed
                if self.validation.due(step + 1, last=step == t.steps - 1):
                    metrics.update(self._validate(step + 1))  # on the weights after this step
                history.append(metrics)
                if step % t.log_every == 0 or step == t.steps - 1:
                    writer.log(step, metrics)
                self.run_lock.refresh()  # the heartbeat that tells a live run from an abandoned lock
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", entropy=f"{metrics.get('entropy', 0):.3f}")
                clock.record_step(elapsed)
                if self._save_and_stop(step):
                    break
        finally:
            bar.close()
            writer.close()
            self.run_lock.release()
        if self.reporting:
            plot_run(t.run_dir)
        return history

    def _validate(self, completed_steps: int) -> dict:
        """The validation sets' accuracy after ``completed_steps`` steps, timed on its own."""
        start = time.perf_counter()
        metrics = self.validation.run(completed_steps)
        metrics["time/validation"] = time.perf_counter() - start
        if self.reporting:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("val/"))
            print(f"[megatron-cegppo] validation after {completed_steps} step(s): {shown}", flush=True)
        return metrics

    def _wandb_factory(self):
        w = self.cfg.wandb
        if not w.enabled:
            return None
        from functools import partial

        from megatron_cegppo.tracking.wandb_logger import WandbLogger

        return partial(WandbLogger, self.cfg.trainer.run_dir, project=w.project, name=w.name, tags=w.tags,
                       mode=w.mode, config=to_dict(self.cfg))

    def _save_and_stop(self, step: int) -> bool:
        """After ``step``: a save when due or stopping; whether the run stops here."""
        t = self.cfg.trainer
        last = step == t.steps - 1
        every = t.save_every and (step + 1) % t.save_every == 0
        stop = self.stops.agreed()
        if last or every or stop:
            saving = time.perf_counter()
            self.save(step)
            self.stops.clock.record_save(time.perf_counter() - saving)
            # a stop signal during the save: the save finished, the run stops now
            stop = stop or (not last and self.stops.agreed())
        if self.reporting:
            save_timing(t.run_dir, self.stops.clock)
        if stop:
            reason = self.stops.reason or "requested on another rank"
            self._stopped(step, reason, f"saved step {step} and stopping: {reason}")
        return stop

    def _stopped(self, step: int, reason: str, line: str) -> None:
        """The run ends early after ``step``, saved: the marker the launcher reads to requeue."""
        self.stopped_at = step
        if self.reporting:  # after the commit: the launcher may requeue now
            print(f"[megatron-cegppo] {line}", flush=True)
            write_stopped_marker(self.cfg.trainer.run_dir, step, reason=reason)
        barrier(self.layout)  # no rank exits (and ends the job) before the marker is there


def train(cfg: Config) -> bool:
    """Runs (or resumes) training; ``False`` when it stopped early on request, after saving."""
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.run_lock.release()
    return getattr(trainer, "stopped_at", None) is None
