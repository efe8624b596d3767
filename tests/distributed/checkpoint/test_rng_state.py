"""A captured random state, saved and loaded with weights_only=True, makes every generator
(torch, numpy, python, megatron's tracker) draw what it would have drawn."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from megatron_cegppo.testing.multiprocess import run_distributed

pytestmark = pytest.mark.distributed


def draws():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracked = torch.rand(3)
    return (torch.rand(3), tracked, np.random.rand(3).tolist(), [random.random() for _ in range(3)],
            np.random.randn(1).tolist())


def worker(rank, world, path):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.checkpoint.rng import capture_rng_state, restore_rng_state
    from megatron_cegppo.cpu_compat import apply_cpu_compat

    apply_cpu_compat()
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(3)
    np.random.randn(1)  # leaves a cached gaussian in numpy's state
    torch.save(capture_rng_state(), path)
    expected = draws()
    draws()  # move every generator on
    restore_rng_state(torch.load(path, weights_only=True))
    return expected, draws()


def test_restored_generators_repeat_their_draws(tmp_path):
    ((expected, again),) = run_distributed(worker, 1, str(tmp_path / "rng.pt"), timeout=120)
    for a, b in zip(expected, again):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a == b
