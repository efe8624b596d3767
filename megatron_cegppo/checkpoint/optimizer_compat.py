"""Workarounds for loading megatron-core 0.16's distributed optimizer when it runs on torch's
Adam (no apex / transformer-engine: every CPU run, and GPU installs without them). Each cites
the upstream function; ``tests/distributed/checkpoint/test_resume.py``
fails without them (resumed losses and weights drift from the uninterrupted run)."""

from __future__ import annotations

import torch

from megatron_cegppo.patching import patch_once


def uses_torch_adam() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _inner_optimizers(optimizer):
    return [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])]


@torch.no_grad()
def materialize_adam_state(optimizer) -> None:
    """Gives every main parameter a zero Adam state (``step``, ``exp_avg``, ``exp_avg_sq``).

    ``DistributedOptimizer.state_dict`` asserts a single ``step`` over all parameter states
    (``assert len(steps) == 1``), which a fresh optimizer (no state yet) cannot satisfy, so
    the sharded state dict to load into cannot be built. The loaded values overwrite these."""
    for inner in _inner_optimizers(optimizer):
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if "exp_avg" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)


def unshare_adam_steps(optimizer) -> None:
    """``DistributedOptimizer.load_state_dict`` gives every parameter state the SAME ``step``
    tensor; torch's Adam increments it in place once per parameter, so the step count runs
    away (3 -> 90 in 3 iterations) and bias correction drifts. One tensor per parameter."""
    for inner in _inner_optimizers(optimizer):
        if inner is None:
            continue
        for state in inner.state.values():
            if "step" in state:
                state["step"] = state["step"].detach().clone()


def patch_set_main_param_and_optimizer_states() -> None:
    """Replaces ``DistributedOptimizer._set_main_param_and_optimizer_states`` (non
    precision-aware branch), which copies every key of the parameter's optimizer state from
    the loaded tensors, ``step`` included, which torch Adam keeps per parameter but the
    checkpoint does not hold per parameter: ``KeyError: 'step'``. Keys the checkpoint lacks
    are left alone (``step`` is restored from the param groups)."""

    def patch() -> None:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        upstream = DistributedOptimizer._set_main_param_and_optimizer_states

        def _set_main_param_and_optimizer_states(self, model_param, tensors):
            if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                return upstream(self, model_param, tensors)
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            dst = {"param": main_param, **self.optimizer.state[main_param]}
            for key, tensor in tensors.items():
                if key in dst:
                    dst[key].copy_(tensor)

        DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states

    patch_once("megatron.distrib_optimizer.set_main_param_and_optimizer_states", patch)
