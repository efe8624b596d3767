"""The learning-rate schedule: linear warm-up, then constant or cosine down to min_lr."""

from __future__ import annotations

import math

import pytest

from megatron_cegppo.config.schema import OptimConfig
from megatron_cegppo.trainer.optim import learning_rate


def test_warmup_then_constant():
    cfg = OptimConfig(lr=1e-3, warmup_steps=4, schedule="constant")
    assert [learning_rate(cfg, s, 100) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_cosine_after_warmup_reaches_min_lr():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, schedule="cosine")
    total = 12
    assert learning_rate(cfg, 2, total) == pytest.approx(1e-3)
    mid = 2 + (total - 2) / 2
    assert learning_rate(cfg, int(mid), total) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(cfg, total, total) == pytest.approx(1e-4)
    assert learning_rate(cfg, total + 5, total) == pytest.approx(1e-4)
