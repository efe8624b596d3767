"""The trainer's checkpoints: what a save holds (model, optimizer, data order, step and every
rank's random state), written by every rank into staging and committed atomically with a
digest of every file; at start the newest one that verifies (hashed in parallel, as it was
written) is resumed from, and a run directory whose checkpoints all fail refuses to start."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from megatron_cegppo.checkpoint.store import CheckpointError, CheckpointStore
from megatron_cegppo.config.schema import TrainerConfig
from megatron_cegppo.platform import Layout
from megatron_cegppo.trainer.collectives import all_finite, barrier, from_rank0, gather_objects
from megatron_cegppo.trainer.policy_update import NonFiniteError

STATE_NAME = "trainer_state.json"


@dataclasses.dataclass
class Resumed:
    path: Path
    step: int  # the step the checkpoint was saved after
    optimizer_steps: int
    extra: dict = dataclasses.field(default_factory=dict)  # the trainer's other state (save's ``extra``)


class TrainerCheckpoints:
    def __init__(self, trainer: TrainerConfig, layout: Layout):
        self.trainer, self.layout = trainer, layout
        self.reporting = layout.rank == 0
        self.store = CheckpointStore(Path(trainer.run_dir) / "checkpoints", keep=trainer.keep_checkpoints)
        self.last_saved_step = -1  # the step of the newest checkpoint (-1: the starting weights)

    # -- save ---------------------------------------------------------------------------------

    def save(self, step: int, policy, *, sampler, optimizer_steps: int, config: dict,
             extra: Optional[dict] = None) -> None:
        """Every rank calls it. Non-finite weights are never saved; a failed save is one
        :class:`CheckpointError` naming why, the newest checkpoint untouched. ``extra``: more of
        the trainer's state, JSON (the same on every rank)."""
        if not all_finite(self.layout, policy.parameters()):
            raise NonFiniteError(f"the weights after step {step} are not finite: not saved (the last checkpoint, "
                                 f"step {self.last_saved_step}, is untouched)")
        try:
            self._write(step, policy, sampler=sampler, optimizer_steps=optimizer_steps, config=config,
                        extra=extra or {})
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # torch.distributed.checkpoint raises BaseExceptions
            from megatron_cegppo.checkpoint.store import describe_write_failure

            kept = (f"the last checkpoint (step {self.last_saved_step}) is untouched" if self.last_saved_step >= 0
                    else "there is no earlier checkpoint")
            raise CheckpointError(f"saving step {step} failed: {describe_write_failure(exc, self.store)}; "
                                  f"{kept}") from exc
        self.last_saved_step = step

    def _write(self, step: int, policy, *, sampler, optimizer_steps: int, config: dict, extra: dict) -> None:
        from megatron_cegppo.checkpoint.megatron_state import save_model_and_optimizer
        from megatron_cegppo.checkpoint.rng import capture_rng_state

        staging = self.store.staging_dir(step)
        if self.reporting:
            self.store.clean_staging()
            (staging / "megatron").mkdir(parents=True)
            (staging / "rng").mkdir()
        barrier(self.layout)
        save_model_and_optimizer(policy.model, policy.optimizer, staging / "megatron")
        torch.save(capture_rng_state(), staging / "rng" / f"rank_{self.layout.rank:05d}.pt")
        if self.reporting:
            (staging / STATE_NAME).write_text(json.dumps({
                "step": step, "optimizer_steps": optimizer_steps, "sampler": sampler.state_dict(),
                "model": dataclasses.asdict(policy.arch), "world_size": self.layout.world, "config": config,
                "extra": extra,
            }, indent=1))
        barrier(self.layout)  # every rank's files are in staging: each hashes its share of them
        parts = gather_objects(self.layout, self.store.digest_share(step, self.layout.rank, self.layout.world))
        if self.reporting:
            self.store.commit(step, digests={name: digest for part in parts for name, digest in part.items()})
        barrier(self.layout)

    # -- resume -------------------------------------------------------------------------------

    def resume(self, policy, sampler, *, config: dict) -> Optional[Resumed]:
        """Loads the run directory's newest checkpoint that verifies (or ``trainer.resume_from``)
        into ``policy`` and ``sampler``; ``None``: a fresh start. A checkpoint saved with a
        config that differs from ``config`` in a setting that alters results is refused,
        naming each difference, unless ``trainer.allow_config_change``."""
        from megatron_cegppo.checkpoint.megatron_state import load_model_and_optimizer
        from megatron_cegppo.checkpoint.rng import restore_rng_state

        explicit = self.trainer.resume_from
        candidates = None
        if self.reporting:
            self.store.clean_staging()
            candidates = [str(explicit)] if explicit else [str(p) for p in self.store.candidates()]
        candidates = [Path(p) for p in from_rank0(self.layout, candidates)]
        chosen, unusable = None, []
        for candidate in candidates:
            verdict = self.verify_together(candidate)
            if verdict is None:
                chosen = candidate
                break
            if explicit:  # an explicit choice: unusable is an error, no fallback
                raise CheckpointError(verdict)
            if candidate.is_dir():  # not a dangling ``latest`` pointer
                unusable.append(f"{candidate.name}: {verdict}")
        if chosen is not None and chosen != candidates[0] and self.reporting:
            print(f"[megatron-cegppo] warning: resuming from {chosen.name} instead", flush=True)
        if chosen is None and unusable and not self.trainer.start_over:
            broken = "\n  ".join(unusable)
            raise CheckpointError(f"{self.store.root}: no checkpoint can be resumed from, and starting again from "
                                  f"model.path would drop them silently:\n  {broken}\nset trainer.start_over=true "
                                  "to start again anyway")
        if chosen is None:
            return None
        state = json.loads((chosen / STATE_NAME).read_text())
        if state["model"] != dataclasses.asdict(policy.arch):  # the more specific refusal first
            raise CheckpointError(f"{chosen} holds a different model: {state['model']} vs "
                                  f"{dataclasses.asdict(policy.arch)}")
        self._check_config(chosen, state.get("config"), config)
        load_model_and_optimizer(policy.model, policy.optimizer, chosen / "megatron")
        sampler.load_state_dict(state["sampler"])
        rng_file = chosen / "rng" / f"rank_{self.layout.rank:05d}.pt"
        if state["world_size"] == self.layout.world and rng_file.exists():
            restore_rng_state(torch.load(rng_file, weights_only=True))
        self.last_saved_step = state["step"]
        if self.reporting:
            print(f"[megatron-cegppo] resumed from {chosen} at step {state['step'] + 1}", flush=True)
        return Resumed(path=chosen, step=state["step"], optimizer_steps=state["optimizer_steps"],
                       extra=state.get("extra", {}))

    def _check_config(self, path: Path, saved: Optional[dict], config: dict) -> None:
        from megatron_cegppo.config.errors import ConfigError
        from megatron_cegppo.tracking.run_dir import result_changes

        if saved is None or self.trainer.allow_config_change:
            return
        altering, _ = result_changes(saved, config)
        if altering:
            changes = "\n  ".join(altering)
            raise ConfigError(f"{path} was saved by a run whose config differs in what the run computes "
                              f"(saved -> given):\n  {changes}\nuse a new trainer.run_dir, or set "
                              "trainer.allow_config_change=true to continue with the given config")

    def verify_together(self, path: Path) -> Optional[str]:
        """Why checkpoint ``path`` cannot be resumed from (``None``: it verifies). Every rank
        hashes its share of the files, rank 0 checks them against the manifest: a large
        checkpoint is re-hashed at resume as fast as it was at save."""
        L = self.layout
        parts = gather_objects(L, self.store.share_digests(path, L.rank, L.world))
        verdict = None
        if self.reporting:
            try:
                self.store.check(path, digests={k: v for part in parts for k, v in part.items()})
            except CheckpointError as exc:
                verdict = str(exc)
                print(f"[megatron-cegppo] warning: checkpoint unusable: {exc}", flush=True)
        return from_rank0(L, verdict)
