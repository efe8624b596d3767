"""Validation inside the run: the run's validation sets (:mod:`megatron_cegppo.validation`)
before training and every ``validation.every`` steps, through the training's own engines after
the weight push, each engine sampling its share of the rows."""

from __future__ import annotations

from typing import Any

from megatron_cegppo.config import Config
from megatron_cegppo.trainer.collectives import gather_objects
from megatron_cegppo.validation import Scored, load_validation_set, sample_and_score, summarize, validation_sampling


class InRunValidation:
    """The run's validation sets, scored by every engine on its share of the rows (a rollout
    group's leader scores, every rank gets the metrics)."""

    def __init__(self, cfg: Config, tokenizer: Any, layout, engine, *, correct_score: float):
        self.cfg, self.layout, self.engine, self.correct_score = cfg, layout, engine, correct_score
        self.sampling = validation_sampling(cfg)
        self.sets = [load_validation_set(cfg, tokenizer, path, max_tokens=self.sampling.max_tokens)
                     for path in cfg.validation.datasets]
        for vset in self.sets:
            if vset.message and layout.rank == 0:
                print(f"[megatron-cegppo] {vset.message}", flush=True)

    def due(self, completed_steps: int, *, last: bool) -> bool:
        """After ``completed_steps`` steps (0: before training)."""
        v = self.cfg.validation
        if not self.sets:
            return False
        if completed_steps == 0:
            return v.before_training
        return bool(v.every) and (completed_steps % v.every == 0 or last)

    def run(self, completed_steps: int) -> dict:
        L = self.layout
        metrics = {}
        for vset in self.sets:
            rows = list(range(len(vset.records)))[L.rollout_group::L.rollout_groups]
            mine = sample_and_score(self.engine, vset, rows, self.sampling, reward=self.cfg.reward.name,
                                    seed=self.cfg.trainer.seed, step=completed_steps)
            parts = gather_objects(L, Scored(mine.rows, [], mine.rewards) if L.rollout_leader else None)
            metrics.update(summarize(vset, [p for p in parts if p is not None], k=self.cfg.validation.k,
                                     correct_score=self.correct_score))
        return metrics
