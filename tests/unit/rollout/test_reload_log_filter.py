"""The filter on vLLM's layer-wise reload logger drops exactly the rotary layers' "Failed to
load weights" warning and lets everything else through."""

from __future__ import annotations

import logging

import pytest

from megatron_cegppo.rollout.vllm_compat import (
    RELOAD_FAILED_MSG,
    RELOAD_LOGGER,
    BufferOnlyReloadFilter,
    quiet_buffer_only_reload_warnings,
)


def record(msg, *args, level=logging.WARNING):
    return logging.LogRecord(RELOAD_LOGGER, level, __file__, 1, msg, args, None)


@pytest.mark.parametrize("layer", ["RotaryEmbedding", "Llama3RotaryEmbedding"])
def test_drops_the_rotary_warning(layer):
    assert not BufferOnlyReloadFilter().filter(record(RELOAD_FAILED_MSG, layer))


@pytest.mark.parametrize("rec", [
    record(RELOAD_FAILED_MSG, "QKVParallelLinear"),  # a layer with weights that loaded none
    record(RELOAD_FAILED_MSG, "FourierRotaryEmbedding"),  # a rotary layer with parameters
    record("%s: Excessive loading", "RotaryEmbedding", level=logging.DEBUG),
    record("RotaryEmbedding: Failed to load weights"),  # preformatted: not upstream's call
    record("Following weights were not loaded from checkpoint: %s", {"lm_head.weight"}),
])
def test_passes_everything_else(rec):
    assert BufferOnlyReloadFilter().filter(rec)


def test_attached_once_to_the_reload_logger_only():
    logger = logging.getLogger(RELOAD_LOGGER)
    first = quiet_buffer_only_reload_warnings()
    try:
        assert quiet_buffer_only_reload_warnings() is first
        assert sum(isinstance(f, BufferOnlyReloadFilter) for f in logger.filters) == 1
        assert not any(isinstance(f, BufferOnlyReloadFilter) for f in logging.getLogger("vllm").filters)
    finally:
        logger.removeFilter(first)


def test_logger_drops_it_and_passes_others():
    logger = logging.getLogger(RELOAD_LOGGER)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(r.getMessage())
    logger.addHandler(handler)
    quiet = quiet_buffer_only_reload_warnings()
    try:
        logger.warning(RELOAD_FAILED_MSG, "RotaryEmbedding")
        logger.warning(RELOAD_FAILED_MSG, "RowParallelLinear")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(quiet)
    assert seen == ["RowParallelLinear: Failed to load weights", "something else"]
