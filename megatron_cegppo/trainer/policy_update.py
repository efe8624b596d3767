"""The update phase: one optimizer step per mini-batch and epoch, each refused when its
gradients are not finite (megatron's bf16/fp32 optimizer would apply them: only fp16's loss
scaler checks), and a stop after too many such steps in a row."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_cegppo.config.schema import AlgorithmConfig, OptimConfig
from megatron_cegppo.platform import Layout
from megatron_cegppo.trainer.collectives import all_finite


class NonFiniteError(RuntimeError):
    """Training cannot go on: gradients or weights are not finite."""


@dataclass
class UpdateResult:
    stores: list = field(default_factory=list)  # the loss function's per-micro-batch metrics
    grad_norms: list = field(default_factory=list)  # of the optimizer steps taken


class PolicyUpdate:
    """Counts optimizer steps (the learning-rate schedule's clock, saved in checkpoints) and
    the mini-batches skipped for non-finite gradients."""

    def __init__(self, optim: OptimConfig, algorithm: AlgorithmConfig, layout: Layout, *, total_steps: int,
                 max_consecutive_nonfinite: int, reporting: bool):
        self.optim, self.algorithm, self.layout = optim, algorithm, layout
        self.total_optimizer_steps = total_steps * algorithm.minibatches * algorithm.epochs
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.reporting = reporting
        self.optimizer_steps = 0
        self.nonfinite_skipped = 0  # this start's
        self.consecutive_nonfinite = 0

    def __call__(self, policy, minibatches: list) -> UpdateResult:
        from megatron_cegppo.parallel.pipeline_loss import (
            make_policy_forward_step, minibatch_loss_normalizer, positive_loss_normalizer,
        )
        from megatron_cegppo.trainer.optim import learning_rate, set_learning_rate

        a, L = self.algorithm, self.layout
        result = UpdateResult()
        for _ in range(a.epochs):
            for micro in minibatches:
                norm = minibatch_loss_normalizer([m.loss_mask for m in micro], a.loss_agg_mode, L.dp_group)
                positive = (positive_loss_normalizer(micro, a.loss_agg_mode, L.dp_group)
                            if a.positive_loss_coeff else None)
                for m in micro:
                    m.loss_normalizer, m.positive_normalizer = norm, positive
                set_learning_rate(policy.optimizer,
                                  learning_rate(self.optim, self.optimizer_steps, self.total_optimizer_steps))
                forward_step = make_policy_forward_step(policy.spec, num_microbatches=len(micro), dp_world_size=L.dp)
                stores = policy.schedule(forward_step, micro) or []
                if all_finite(L, policy.grad_buffers()):
                    self.consecutive_nonfinite = 0
                    result.stores.extend(stores)
                    _, grad_norm, _ = policy.optimizer.step()
                    if grad_norm is not None:
                        result.grad_norms.append(float(grad_norm))
                else:
                    self._skipped()
                policy.zero_grad()
                self.optimizer_steps += 1
        return result

    def _skipped(self) -> None:
        self.nonfinite_skipped += 1
        self.consecutive_nonfinite += 1
        if self.reporting:
            print(f"[megatron-cegppo] warning: non-finite gradients at optimizer step {self.optimizer_steps}: "
                  "mini-batch skipped, weights unchanged", flush=True)
        if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"{self.consecutive_nonfinite} mini-batches in a row had non-finite gradients "
                f"(trainer.max_consecutive_nonfinite={self.max_consecutive_nonfinite}): stopping; "
                "the last checkpoint is untouched (lower optim.lr, check the data and rewards)")
