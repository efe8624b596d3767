"""The CE-GPPO training loop: generate with vLLM, score, compute advantages, recompute the
old log-probs with Megatron, update on mini-batches, push the weights back into vLLM."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_cegppo.algorithms.advantages import grpo_advantages
from megatron_cegppo.checkpoint.store import CheckpointStore
from megatron_cegppo.config import Config, to_dict
from megatron_cegppo.parallel.microbatch import MicroBatch
from megatron_cegppo.trainer.distributed import Layout, init_distributed
from megatron_cegppo.trainer.stopping import (
    StopClock, clear_stopped_marker, load_timing, save_timing, stop_file_present, stop_file_urgent,
    write_stopped_marker,
)


def _any_rank(platform, flag) -> bool:
    """Whether ``flag`` (a bool or a 0-dim tensor) holds on any rank: one all-reduced device
    tensor (NCCL takes device tensors only), also in a world of one."""
    flag = flag.to(platform.device, torch.float32) if isinstance(flag, torch.Tensor) else platform.tensor(float(flag))
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class NonFiniteError(RuntimeError):
    """Training cannot go on: gradients or weights are not finite."""


class StepAbandoned(Exception):
    """A step given up before its update because the job is being preempted."""


@dataclasses.dataclass
class StepRollout:
    """A step's trained groups, flattened: one completion per row."""

    completions: list
    prompts: dict  # prompt index -> token ids
    rewards: torch.Tensor  # [groups, n]
    advantages: torch.Tensor  # [completions]
    seq_len: int  # the longest prompt + response, label-aligned, padded to 8 x TP

    def length(self, i: int) -> int:
        """Model positions of completion ``i`` (prompt + response - 1, label-aligned)."""
        c = self.completions[i]
        return len(self.prompts[c.prompt_index]) + len(c.token_ids) - 1


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, engine=None):
        """``engine``: the rollout engine to use instead of starting vLLM (anything with
        ``generate``, ``push_weights``, ``sleep`` and ``wake_up``, such as
        :class:`megatron_cegppo.rollout.replay.ReplayEngine`)."""
        from transformers import AutoTokenizer

        from megatron_cegppo.data.prompts import load_prompts, tokenize_prompts
        from megatron_cegppo.data.sampler import ShuffledSampler
        from megatron_cegppo.rollout import EngineConfig, RolloutEngine, SamplingConfig
        from megatron_cegppo.trainer.rollout_phase import RolloutPhase

        self.cfg = cfg
        self.layout: Layout = init_distributed(cfg)
        if (cfg.algorithm.max_tokens_per_microbatch and self.layout.platform.packed_attention == "thd"
                and cfg.model.dtype != "bfloat16"):
            from megatron_cegppo.config import ConfigError

            # flash and fused attention, the backends of THD, take 16-bit inputs only
            raise ConfigError("packed micro-batches (algorithm.max_tokens_per_microbatch) use transformer-engine's "
                              "THD attention, which needs model.dtype=bfloat16")
        self.reporting = self.layout.rank == 0
        self._lock_run_dir()
        _seed_everything(cfg.trainer.seed)

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        records = load_prompts(cfg.data.train_path, prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key)
        # a prompt too long for the model is refused (or cut, data.truncation) here, not at
        # the first generation that samples it
        fitted = tokenize_prompts(tokenizer, records, cfg, source=cfg.data.train_path)
        for rec, ids in zip(records, fitted.token_ids):
            rec["token_ids"] = ids
        if fitted.message and self.reporting:
            print(f"[megatron-cegppo] {fitted.message}", flush=True)
        self.prompts = records
        self.sampler = ShuffledSampler(len(records), seed=cfg.trainer.seed, shuffle=cfg.data.shuffle)

        r = cfg.rollout
        # The engine first: vLLM reseeds the global RNG; megatron's RNG is seeded after it.
        self.engine = engine if engine is not None else RolloutEngine(
            cfg.model.path,
            EngineConfig(tensor_parallel_size=r.tensor_parallel, dtype=cfg.model.dtype, max_model_len=r.max_model_len,
                         kv_cache_bytes=r.kv_cache_bytes, gpu_memory_utilization=r.gpu_memory_utilization,
                         load_format="dummy"),  # its weights come from the trainer's first push
            seed=cfg.trainer.seed,
        )
        self.sampling = SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens,
                                       stop=tuple(r.stop))
        self.rollout = RolloutPhase(self.engine, self.layout, records, reward=cfg.reward.name,
                                    sampling=self.sampling, seed=cfg.trainer.seed)
        self._build_model()
        self.optimizer_steps = 0
        self.start_step = 0
        self.last_saved_step = -1  # the step of the newest checkpoint (-1: the starting weights)
        self.nonfinite_skipped = 0  # mini-batches skipped for non-finite gradients, this start
        self.consecutive_nonfinite = 0
        self.stop_requested = False
        self.store = CheckpointStore(Path(cfg.trainer.run_dir) / "checkpoints", keep=cfg.trainer.keep_checkpoints)
        self._resume()
        # the engine started without the folder's weights: it gets Megatron's (the starting or
        # the resumed ones) before its first generation
        self._sync_weights()

    def _build_model(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        from megatron_cegppo.models import build_gpt_from_hf, import_hf_weights, read_hf_config
        from megatron_cegppo.losses import loss_kwargs
        from megatron_cegppo.parallel.pipeline_loss import PolicyLossSpec
        from megatron_cegppo.trainer.optim import build_optimizer

        cfg = self.cfg
        model_parallel_cuda_manual_seed(cfg.trainer.seed)
        bf16 = cfg.model.dtype == "bfloat16"
        p = cfg.parallel
        hf_config = read_hf_config(cfg.model.path)

        def build():
            # bf16: parameters and activations in bf16, fp32 master weights in the optimizer
            # (build_optimizer), gradients reduced in fp32 (ddp_config below). No megatron
            # Float16Module: the parameters are built in bf16 already, the inputs are token
            # ids, and its one other effect, casting the last stage's output to fp32, would
            # materialize [tokens, V/TP] fp32 logits, where the loss upcasts chunk by chunk.
            return build_gpt_from_hf(
                hf_config, tp=p.tensor, pp=p.pipeline, vpp=p.virtual_pipeline,
                sequence_parallel=p.sequence_parallel, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                recompute=p.recompute,
            )

        self.arch, self.tconfig, chunks, padded = build()
        # only this rank's slices of its stage's tensors are read from the folder
        import_hf_weights(chunks, cfg.model.path, self.arch, padded)
        self.reference = None
        if cfg.algorithm.kl_coeff > 0:  # the starting policy, frozen, for the KL term
            _, _, self.reference, _ = build()
            import_hf_weights(self.reference, cfg.model.path, self.arch, padded)
            for chunk in self.reference:
                chunk.requires_grad_(False)
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
        self.model = [DistributedDataParallel(self.tconfig, ddp_config, c) for c in chunks]
        self.optimizer = build_optimizer(cfg.optim, self.model, bf16=bf16)
        a = cfg.algorithm
        self.spec = PolicyLossSpec(loss=a.loss, loss_kwargs=loss_kwargs(a.loss, a), loss_agg_mode=a.loss_agg_mode,
                                   temperature=cfg.rollout.temperature, vocab_size=self.arch.vocab_size,
                                   logprob_impl=cfg.model.logprob_impl, entropy_coeff=a.entropy_coeff,
                                   kl_coeff=a.kl_coeff)

    # -- one step ---------------------------------------------------------------------------

    def _schedule(self, forward_step, microbatches, forward_only=False, chunks=None):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        chunks = self.model if chunks is None else chunks
        model = chunks if len(chunks) > 1 else chunks[0]
        data = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
        rows, tokens = microbatches[0].input_ids.shape  # one shape per call: p2p buffers are sized by it
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=model,
            num_microbatches=len(microbatches), seq_length=tokens, micro_batch_size=rows,
            forward_only=forward_only,
        )

    def train_step(self, step: int, timer) -> dict:
        """One RL step, phase by phase: generate (vLLM; each response scored by the reward as
        it comes, for dynamic sampling), advantages, pack, recompute log-probs, update, sync."""
        a = self.cfg.algorithm
        with timer.phase("generate"):
            groups, seen_rewards, sampling_stats = self.rollout.collect(
                self.sampler, step=step, num_prompts=a.prompts_per_step, dynamic=a.dynamic_sampling,
                max_rounds=a.max_sampling_rounds)
            self.engine.sleep()  # GPU: frees vLLM's memory for training; a no-op on the CPU
        self._abandon_if_preempted(step)
        with timer.phase("advantages"):
            rollout = self._advantages(groups)
        with timer.phase("pack"):
            minibatches = self._pack(rollout)
        with timer.phase("old_log_prob"):
            mismatch = self._recompute_log_probs(minibatches)
        self._abandon_if_preempted(step)  # the last point before the weights change
        with timer.phase("train"):
            stores, grad_norms = self._update(minibatches)
        with timer.phase("weight_sync"):
            self._sync_weights()
        return self._step_metrics(rollout, minibatches, stores, grad_norms, mismatch, seen_rewards, sampling_stats)

    def _advantages(self, groups) -> "StepRollout":
        a = self.cfg.algorithm
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
        completions = [c for g in groups for c in g.completions]
        prompts = {g.prompt_index: g.prompt_ids for g in groups}
        longest = max(len(prompts[c.prompt_index]) + len(c.token_ids) for c in completions) - 1
        multiple = 8 * self.layout.tp
        return StepRollout(completions=completions, prompts=prompts, rewards=rewards,
                           advantages=grpo_advantages(rewards, self.sampling.n, normalize_std=a.normalize_advantage_std),
                           seq_len=-(-longest // multiple) * multiple)

    def _pack(self, rollout: "StepRollout") -> list[list[MicroBatch]]:
        """This rank's micro-batches of each mini-batch, on the model's device. Packed (with
        ``algorithm.max_tokens_per_microbatch``): the mini-batch's sequences balanced over the
        data-parallel ranks by real tokens and packed into rows of the budget (padded to the
        TP/SP multiple); every micro-batch has that one shape, as pipeline schedules need.
        Unpacked: ``micro_batch_size`` rows padded to the step's longest sequence."""
        from megatron_cegppo.algorithms.packing import pack_microbatches, split_to_multiple
        from megatron_cegppo.rollout.batch import build_microbatches

        a, L = self.cfg.algorithm, self.layout
        common = dict(pad_id=self.pad_id, seq_len=rollout.seq_len, place=L.platform.place)
        per_mb = len(rollout.completions) // a.minibatches
        minibatches = []
        for m in range(a.minibatches):
            rows = list(range(m * per_mb, (m + 1) * per_mb))
            if a.max_tokens_per_microbatch is None:  # this rank's contiguous share
                per_rank = per_mb // L.dp
                rows = rows[L.dp_rank * per_rank:(L.dp_rank + 1) * per_rank]
                minibatches.append(build_microbatches(
                    rollout.prompts, [rollout.completions[i] for i in rows], rollout.advantages[rows],
                    micro_batch_size=a.micro_batch_size, **common))
                continue
            lengths = [rollout.length(i) for i in rows]
            mine = pack_microbatches(lengths, max_tokens=a.max_tokens_per_microbatch, dp_size=L.dp)[L.dp_rank]
            if self.cfg.parallel.virtual_pipeline:
                mine = split_to_multiple(mine, lengths, L.pp)
            chosen = sorted(j for pack in mine for j in pack)  # positions in ``rows`` of my sequences
            where = {j: k for k, j in enumerate(chosen)}
            multiple = 8 * L.tp
            minibatches.append(build_microbatches(
                rollout.prompts, [rollout.completions[rows[j]] for j in chosen],
                rollout.advantages[[rows[j] for j in chosen]],
                packs=[[where[j] for j in pack] for pack in mine],
                packed_tokens=-(-a.max_tokens_per_microbatch // multiple) * multiple,
                attention=L.platform.packed_attention, **common))
        return minibatches

    def _recompute_log_probs(self, minibatches: list[list[MicroBatch]]) -> dict:
        """The current (old) policy's log-probs, and the reference model's for a KL term, into
        each micro-batch; the train/rollout mismatch; truncated importance weights."""
        from megatron_cegppo.parallel.pipeline_loss import make_logprob_forward_step
        from megatron_cegppo.rollout.mismatch import logprob_mismatch, truncated_importance_weights

        a, L = self.cfg.algorithm, self.layout
        forward = make_logprob_forward_step(self.spec)
        for micro in minibatches:
            with torch.no_grad():
                out = self._schedule(forward, micro, forward_only=True)
            for m, o in zip(micro, out or [{}] * len(micro)):
                m.old_log_prob = o.get("log_prob", torch.zeros_like(m.loss_mask))
            if self.reference is not None:
                with torch.no_grad():
                    ref = self._schedule(forward, micro, forward_only=True, chunks=self.reference)
                for m, o in zip(micro, ref or [{}] * len(micro)):
                    m.ref_log_prob = o.get("log_prob", torch.zeros_like(m.loss_mask))
        if not L.is_last_stage:
            return {}
        every = [m for micro in minibatches for m in micro]
        mismatch = logprob_mismatch(torch.cat([m.rollout_log_prob for m in every]),
                                    torch.cat([m.old_log_prob for m in every]), torch.cat([m.loss_mask for m in every]))
        if a.tis_cap is not None:
            for m in every:
                m.advantages = m.advantages * truncated_importance_weights(m.old_log_prob, m.rollout_log_prob, a.tis_cap)
        return mismatch

    def _update(self, minibatches: list[list[MicroBatch]]):
        """One optimizer step per mini-batch and epoch."""
        from megatron_cegppo.parallel.pipeline_loss import make_policy_forward_step, minibatch_loss_normalizer
        from megatron_cegppo.trainer.optim import learning_rate, set_learning_rate

        cfg, a, L = self.cfg, self.cfg.algorithm, self.layout
        stores, grad_norms = [], []
        for _ in range(a.epochs):
            for micro in minibatches:
                norm = minibatch_loss_normalizer([m.loss_mask for m in micro], a.loss_agg_mode, L.dp_group)
                for m in micro:
                    m.loss_normalizer = norm
                set_learning_rate(self.optimizer, learning_rate(cfg.optim, self.optimizer_steps,
                                                                cfg.trainer.steps * a.minibatches * a.epochs))
                forward_step = make_policy_forward_step(self.spec, num_microbatches=len(micro), dp_world_size=L.dp)
                mb_stores = self._schedule(forward_step, micro) or []
                if self._all_finite(self._grad_buffers()):
                    self.consecutive_nonfinite = 0
                    stores.extend(mb_stores)
                    _, grad_norm, _ = self.optimizer.step()
                    if grad_norm is not None:
                        grad_norms.append(float(grad_norm))
                else:  # megatron's bf16/fp32 optimizer would apply it (only fp16's scaler checks)
                    self.nonfinite_skipped += 1
                    self.consecutive_nonfinite += 1
                    if self.reporting:
                        print(f"[megatron-cegppo] warning: non-finite gradients at optimizer step "
                              f"{self.optimizer_steps}: mini-batch skipped, weights unchanged", flush=True)
                    if self.consecutive_nonfinite >= cfg.trainer.max_consecutive_nonfinite:
                        raise NonFiniteError(
                            f"{self.consecutive_nonfinite} mini-batches in a row had non-finite gradients "
                            f"(trainer.max_consecutive_nonfinite={cfg.trainer.max_consecutive_nonfinite}): stopping; "
                            "the last checkpoint is untouched (lower optim.lr, check the data and rewards)")
                for chunk in self.model:
                    chunk.zero_grad_buffer()
                self.optimizer.zero_grad()
                self.optimizer_steps += 1
        return stores, grad_norms

    def _grad_buffers(self) -> list:
        """The gradients as megatron's DDP keeps them: a few flat buffers per model chunk."""
        flat = [b.grad_data for chunk in self.model for b in getattr(chunk, "buffers", [])]
        return flat or [p.main_grad for chunk in self.model for p in chunk.parameters()]

    def _all_finite(self, tensors) -> bool:
        """Whether every tensor on every rank is finite: accumulated on the device, one
        all-reduced flag, one host sync."""
        bad = self.layout.platform.tensor(0.0)
        for t in tensors:
            if t is not None and t.numel():
                bad = torch.maximum(bad, (~torch.isfinite(t)).any().to(bad.dtype))
        return not _any_rank(self.layout.platform, bad)

    def _sync_weights(self) -> None:
        from megatron_cegppo.rollout.weight_sync import push_megatron_weights

        push_megatron_weights(self.engine, self.model, self.arch, bucket_bytes=self.cfg.rollout.weight_bucket_bytes)

    def _token_counts(self, minibatches: list[list[MicroBatch]]) -> dict:
        """Real and computed tokens of the step's forward passes (the recompute, the reference
        and every epoch's update), over all data-parallel replicas: what padding costs."""
        a = self.cfg.algorithm
        passes = 1 + (self.reference is not None) + a.epochs
        every = [m for micro in minibatches for m in micro]
        counts = self.layout.platform.tensor([sum(m.real_tokens for m in every) * passes,
                                              sum(m.computed_tokens for m in every) * passes], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(counts, group=self.layout.dp_group)
        real, computed = (float(x) for x in counts.tolist())
        return {"tokens/real": real, "tokens/computed": computed, "tokens/computed_per_real": computed / max(real, 1.0)}

    def _step_metrics(self, rollout, minibatches, stores, grad_norms, mismatch, seen_rewards, sampling_stats) -> dict:
        from megatron_cegppo.parallel.pipeline_loss import reduce_microbatch_metrics

        local = dict(reduce_microbatch_metrics(stores)) if stores else {}
        local.update(mismatch)
        lengths = [len(c.token_ids) for c in rollout.completions]
        metrics = {
            "reward_mean": float(np.mean(seen_rewards)),
            "reward_mean_trained": float(rollout.rewards.mean()),
            "response_length_mean": float(np.mean(lengths)),
            "grad_norm": float(np.mean(grad_norms)) if grad_norms else 0.0,
            "lr": self.optimizer.param_groups[0]["lr"],
            "nonfinite_skipped": float(self.nonfinite_skipped),
            "tokens": sum(lengths) + sum(len(rollout.prompts[c.prompt_index]) for c in rollout.completions),
            **self._token_counts(minibatches),
            **sampling_stats,
        }
        return self._merge_across_ranks(local, metrics)

    def _merge_across_ranks(self, local: dict, common: dict) -> dict:
        """The last pipeline stage's metrics, one report per data-parallel replica (TP rank 0),
        combined as micro-batches are: sums of counts, token-weighted means, maxima. The
        result does not depend on the layout."""
        from megatron_cegppo.parallel.pipeline_loss import reduce_microbatch_metrics

        mine = local if (self.layout.is_last_stage and self.layout.tp_rank == 0) else None
        parts = [mine]
        if dist.is_initialized() and self.layout.world > 1:
            parts = [None] * self.layout.world
            dist.all_gather_object(parts, mine)
        merged = dict(common)
        merged.update(reduce_microbatch_metrics([p for p in parts if p]))
        return merged

    # -- checkpoints ------------------------------------------------------------------------

    def _barrier(self) -> None:
        if dist.is_initialized() and self.layout.world > 1:
            dist.barrier()

    def save(self, step: int) -> None:
        """Model, optimizer, data order, step and every rank's random state, atomically."""
        if not self._all_finite(p for chunk in self.model for p in chunk.parameters()):
            raise NonFiniteError(f"the weights after step {step} are not finite: not saved (the last checkpoint, "
                                 f"step {self.last_saved_step}, is untouched)")
        try:
            self._write_checkpoint(step)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # torch.distributed.checkpoint raises BaseExceptions
            from megatron_cegppo.checkpoint.store import CheckpointError, describe_write_failure

            kept = (f"the last checkpoint (step {self.last_saved_step}) is untouched" if self.last_saved_step >= 0
                    else "there is no earlier checkpoint")
            raise CheckpointError(f"saving step {step} failed: {describe_write_failure(exc, self.store)}; "
                                  f"{kept}") from exc
        self.last_saved_step = step

    def _write_checkpoint(self, step: int) -> None:
        from megatron_cegppo.checkpoint.megatron_state import save_model_and_optimizer
        from megatron_cegppo.checkpoint.rng import capture_rng_state

        staging = self.store.staging_dir(step)
        if self.reporting:
            self.store.clean_staging()
            (staging / "megatron").mkdir(parents=True)
            (staging / "rng").mkdir()
        self._barrier()
        save_model_and_optimizer(self.model, self.optimizer, staging / "megatron")
        torch.save(capture_rng_state(), staging / "rng" / f"rank_{self.layout.rank:05d}.pt")
        if self.reporting:
            (staging / "trainer_state.json").write_text(json.dumps({
                "step": step, "optimizer_steps": self.optimizer_steps, "sampler": self.sampler.state_dict(),
                "model": dataclasses.asdict(self.arch), "world_size": self.layout.world,
                "config": to_dict(self.cfg),
            }, indent=1))
        self._barrier()  # every rank's files are in staging: each hashes its share of them
        mine = self.store.digest_share(step, self.layout.rank, self.layout.world)
        parts = [mine]
        if dist.is_initialized() and self.layout.world > 1:
            parts = [None] * self.layout.world
            dist.all_gather_object(parts, mine)  # file names and hex digests: small
        if self.reporting:
            self.store.commit(step, digests={name: digest for part in parts for name, digest in part.items()})
        self._barrier()

    def _resume(self) -> None:
        """Continues from the run directory's latest complete checkpoint, if there is one."""
        from megatron_cegppo.checkpoint import CheckpointError
        from megatron_cegppo.checkpoint.megatron_state import load_model_and_optimizer
        from megatron_cegppo.checkpoint.rng import restore_rng_state

        explicit = self.cfg.trainer.resume_from
        box = [None]  # the checkpoints to try, in order
        if self.reporting:
            self.store.clean_staging()
            box = [[str(explicit)] if explicit else [str(p) for p in self.store.candidates()]]
        if dist.is_initialized() and self.layout.world > 1:
            dist.broadcast_object_list(box, src=0)
        chosen, unusable = None, []
        for candidate in map(Path, box[0]):
            verdict = self._verify_together(candidate)
            if verdict is None:
                chosen = candidate
                break
            if explicit:  # an explicit choice: unusable is an error, no fallback
                raise CheckpointError(verdict)
            if candidate.is_dir():  # not a dangling ``latest`` pointer
                unusable.append(f"{candidate.name}: {verdict}")
        if chosen is not None and chosen != Path(box[0][0]) and self.reporting:
            print(f"[megatron-cegppo] warning: resuming from {chosen.name} instead", flush=True)
        if chosen is None and unusable and not self.cfg.trainer.start_over:
            broken = "\n  ".join(unusable)
            raise CheckpointError(f"{self.store.root}: no checkpoint can be resumed from, and starting again from "
                                  f"model.path would drop them silently:\n  {broken}\nset trainer.start_over=true "
                                  "to start again anyway")
        if chosen is None:
            return
        path = chosen
        state = json.loads((path / "trainer_state.json").read_text())
        if state["model"] != dataclasses.asdict(self.arch):
            raise CheckpointError(f"{path} holds a different model: {state['model']} vs {dataclasses.asdict(self.arch)}")
        load_model_and_optimizer(self.model, self.optimizer, path / "megatron")
        self.sampler.load_state_dict(state["sampler"])
        self.optimizer_steps = state["optimizer_steps"]
        self.start_step = state["step"] + 1
        self.last_saved_step = state["step"]
        rng_file = path / "rng" / f"rank_{self.layout.rank:05d}.pt"
        if state["world_size"] == self.layout.world and rng_file.exists():
            restore_rng_state(torch.load(rng_file, weights_only=True))
        if self.reporting:
            print(f"[megatron-cegppo] resumed from {path} at step {self.start_step}", flush=True)

    def _verify_together(self, path: Path) -> Optional[str]:
        """Why checkpoint ``path`` cannot be resumed from (``None``: it verifies). Every rank
        hashes its share of the files, rank 0 checks them against the manifest: a large
        checkpoint is re-hashed at resume as fast as it was at save."""
        from megatron_cegppo.checkpoint import CheckpointError

        L = self.layout
        mine = self.store.share_digests(path, L.rank, L.world)
        parts = [mine]
        if dist.is_initialized() and L.world > 1:
            parts = [None] * L.world
            dist.all_gather_object(parts, mine)
        verdict = [None]
        if self.reporting:
            try:
                self.store.check(path, digests={k: v for part in parts for k, v in part.items()})
            except CheckpointError as exc:
                verdict = [str(exc)]
                print(f"[megatron-cegppo] warning: checkpoint unusable: {exc}", flush=True)
        if dist.is_initialized() and L.world > 1:
            dist.broadcast_object_list(verdict, src=0)
        return verdict[0]

    def request_stop(self, signum=None, _frame=None) -> None:
        """Signal handler: save and stop at the end of the current step; on SIGTERM (Slurm's
        preemption or cancellation, followed by SIGKILL after the grace time) sooner, see
        :meth:`_abandon_if_preempted`."""
        self.stop_requested = True
        if signum == signal.SIGTERM:
            self.preempted = True

    @staticmethod
    def _set_aside_old_metrics(run_dir: Path) -> None:
        """A fresh start in a run directory that holds another run's metrics (but no checkpoint
        to resume from) keeps them as ``metrics.<timestamp>.jsonl``, instead of appending its
        step 0 after their last step."""
        from datetime import datetime

        from megatron_cegppo.tracking.metrics import METRICS_NAME

        old = run_dir / METRICS_NAME
        if old.is_file() and old.stat().st_size:
            kept = run_dir / f"metrics.{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.jsonl"
            os.replace(old, kept)
            print(f"[megatron-cegppo] warning: {old} held the metrics of an earlier run without a checkpoint; "
                  f"kept as {kept.name}, this run starts a new file", flush=True)

    def _lock_run_dir(self) -> None:
        """One run per run directory (before anything there is touched: resuming cleans the
        checkpoint staging area). Rank 0 holds the lock for the job; its verdict reaches every
        rank, so a refused start stops everywhere instead of hanging at a barrier."""
        from megatron_cegppo.tracking.run_lock import RunLock, RunLockedError

        # longer than a step and a save of the largest configs: another host's lock whose
        # heartbeat is older counts as abandoned
        self.run_lock = RunLock(self.cfg.trainer.run_dir, stale_after_seconds=3 * 3600, enabled=self.reporting)
        error = [None]
        if self.reporting:
            try:
                self.run_lock.acquire()
            except RunLockedError as exc:
                error = [str(exc)]
        if dist.is_initialized() and self.layout.world > 1:
            dist.broadcast_object_list(error, src=0)
        if error[0]:
            raise RunLockedError(error[0])

    def _abandon_if_preempted(self, step: int) -> None:
        """Before the step's first optimizer step: when any rank was preempted (SIGTERM, or the
        batch script's ``STOP`` file saying so), the step is given up. Its rollouts are lost,
        nothing else: the weights, the optimizer and the data order are those at the end of
        the previous step, which is saved at once (instead of after the rest of a step that can
        take longer than the grace time). Every rank calls it at the same points."""
        urgent = getattr(self, "preempted", False) or (self.reporting and stop_file_urgent(self.cfg.trainer.run_dir))
        if _any_rank(self.layout.platform, urgent):
            raise StepAbandoned(step)

    def _stop_reason(self) -> Optional[str]:
        """Why this rank would stop now: a signal, a ``STOP`` file in the run directory (what
        the Slurm batch script writes: it reaches every rank without crossing srun and
        torchrun), or (rank 0) a job time limit closer than one more step and a save."""
        if self.stop_requested:
            return "requested"
        if not self.reporting:
            return None
        if stop_file_present(self.cfg.trainer.run_dir):
            return "requested"
        clock = getattr(self, "clock", None)
        return clock.should_stop() if clock is not None else None

    def _stop_agreed(self) -> bool:
        """Whether any rank has a reason to stop (every rank calls it at the end of a step)."""
        self.stop_reason = self._stop_reason()
        return _any_rank(self.layout.platform, self.stop_reason is not None)

    # -- the run ----------------------------------------------------------------------------

    def fit(self) -> list[dict]:
        from megatron_cegppo.tracking.metrics import MetricsWriter
        from megatron_cegppo.tracking.plots import plot_run
        from megatron_cegppo.tracking.progress import PhaseTimer, progress
        from megatron_cegppo.tracking.run_dir import prepare_run_dir

        cfg = self.cfg
        run_dir = cfg.trainer.run_dir
        if self.reporting:
            # a fresh start (no checkpoint to continue) may change anything; the old config is kept
            prepare_run_dir(run_dir, to_dict(cfg),
                            allow_config_change=cfg.trainer.allow_config_change or self.start_step == 0)
            clear_stopped_marker(run_dir)
        if dist.is_initialized():
            dist.barrier()
        if self.reporting and self.start_step == 0:
            self._set_aside_old_metrics(Path(run_dir))
        # a resumed run drops the records of the steps it runs again; a fresh one starts empty
        writer = MetricsWriter(run_dir, enabled=self.reporting, truncate_after_step=self.start_step - 1)
        timer = PhaseTimer()
        history = []
        # the job's end time (from the batch script) against the step and save times measured
        # so far, in this start and the previous ones
        self.clock = StopClock.from_env(measured=load_timing(run_dir))
        warning = self.clock.lead_warning()
        if warning and self.reporting:
            print(f"[megatron-cegppo] warning: {warning}", flush=True)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self.request_stop)
        bar = progress(cfg.trainer.steps, desc="CE-GPPO steps", enabled=self.reporting, initial=self.start_step)
        from megatron_cegppo.checkpoint.rng import capture_rng_state, restore_rng_state

        try:
            for step in range(self.start_step, cfg.trainer.steps):
                timer.reset()
                start = time.perf_counter()
                at_start = (self.sampler.state_dict(), capture_rng_state())
                try:
                    metrics = self.train_step(step, timer)
                except StepAbandoned:
                    self.sampler.load_state_dict(at_start[0])
                    restore_rng_state(at_start[1])
                    if self.last_saved_step != step - 1:  # nothing to save before the first step
                        self.save(step - 1)
                    self.stopped_at = step - 1
                    if self.reporting:
                        reason = f"preempted: step {step} given up before its update"
                        print(f"[megatron-cegppo] {reason}; the state after step {step - 1} is saved", flush=True)
                        write_stopped_marker(run_dir, step - 1, reason=reason)
                    self._barrier()  # no rank exits (and ends the job) before the marker is there
                    break
                elapsed = time.perf_counter() - start
                metrics.update(timer.summary())
                metrics["time/step"] = elapsed
                metrics["tokens_per_second"] = metrics.pop("tokens") / elapsed
                history.append(metrics)
                if step % cfg.trainer.log_every == 0 or step == cfg.trainer.steps - 1:
                    writer.log(step, metrics)
                self.run_lock.refresh()  # the heartbeat that tells a live run from an abandoned lock
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", entropy=f"{metrics.get('entropy', 0):.3f}")
                last = step == cfg.trainer.steps - 1
                every = cfg.trainer.save_every and (step + 1) % cfg.trainer.save_every == 0
                self.clock.record_step(elapsed)
                stop = self._stop_agreed()
                if last or every or stop:
                    saving = time.perf_counter()
                    self.save(step)
                    self.clock.record_save(time.perf_counter() - saving)
                    # a stop signal during the save: the save finished, the run stops now
                    stop = stop or (not last and self._stop_agreed())
                if self.reporting:
                    save_timing(run_dir, self.clock)
                if stop:
                    self.stopped_at = step
                    if self.reporting:  # after the commit: the launcher may requeue now
                        reason = self.stop_reason or "requested on another rank"
                        print(f"[megatron-cegppo] saved step {step} and stopping: {reason}", flush=True)
                        write_stopped_marker(run_dir, step, reason=reason)
                    self._barrier()  # no rank exits (and ends the job) before the marker is there
                    break
        finally:
            bar.close()
            writer.close()
            self.run_lock.release()
        if self.reporting:
            plot_run(run_dir)
        return history


def train(cfg: Config) -> bool:
    """Runs (or resumes) training; ``False`` when it stopped early on request, after saving."""
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.run_lock.release()
    return getattr(trainer, "stopped_at", None) is None
