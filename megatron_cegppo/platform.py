"""The one place that decides what this process runs on.

Everything that differs between a GPU node and a CPU machine is decided here, once per
process, and nowhere else in the package:

- the device (``cuda:LOCAL_RANK`` or ``cpu``; the ``trainer.device`` setting ``auto | cuda |
  cpu``), failing at start-up with the driver/torch mismatch named when CUDA was expected;
- the process-group backend (NCCL, which accepts CUDA tensors only, or gloo) and, from it,
  whether megatron's batched p2p may be used;
- which layer implementation megatron can really import (transformer-engine or its local
  spec), and whether megatron's fused masked-softmax kernels are there;
- the CPU workarounds (``parallel.cpu_compat``), applied only on the CPU.

It also owns the one placement step, :meth:`Platform.place`: every tensor that enters the
model, the loss or a collective is put on :attr:`Platform.device` through it (on a GPU node the
process group is NCCL-only, so a CPU tensor in a collective raises "No backend type associated
with device type cpu").
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_cegppo.config.schema import DEVICE_SETTINGS, Config
from megatron_cegppo.console import quiet_known_noise
from megatron_cegppo.lifeline import exit_with_launcher

LAYER_IMPLS = ("transformer_engine", "local")

# The driver branch each CUDA major version needs (NVIDIA's CUDA toolkit release notes,
# "minimum required driver", Linux).
_MIN_DRIVER = {11: "450.80", 12: "525.60", 13: "580.65"}



SOLO_MASTER_PORT_BASE, SOLO_MASTER_PORT_SPREAD = 29500, 1000  # see init_distributed
class PlatformError(RuntimeError):
    """The machine cannot run what was asked (e.g. ``device=cuda`` without a usable GPU)."""


@dataclass(frozen=True)
class Platform:
    device: torch.device
    backend: str  # the default process group's backend: "nccl" | "gloo"
    layer_impl: str  # "transformer_engine" | "local"
    layer_reason: str  # why (what was or was not importable)
    fused_softmax: bool  # megatron's scaled_masked_softmax kernels (apex / Megatron-LM builds)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def batch_p2p_comm(self) -> bool:
        """megatron's batched p2p (``batch_isend_irecv``) pairs two isends to one peer with the
        wrong irecvs on gloo under interleaved pipelines and silently exchanges the wrong
        activations (``p2p_communication._batched_p2p_ops``); the unbatched path is correct.
        NCCL keeps megatron's default (batched)."""
        return self.backend != "gloo"

    @property
    def packed_attention(self) -> str:
        """How packed micro-batches keep sequences apart: megatron's THD ``packed_seq_params``
        where transformer-engine attention runs (cu_seqlens, RoPE restarting per sequence);
        a block-diagonal causal mask for megatron's local attention, which refuses
        packed_seq_params (``DotProductAttention.forward`` asserts it is None)."""
        return "thd" if self.layer_impl == "transformer_engine" else "mask"

    @property
    def fused_kernels(self) -> bool:
        """megatron's bias-activation / bias-dropout fusions (torch.jit / triton on the GPU)."""
        return self.is_cuda

    def place(self, obj: Any, *, non_blocking: bool = True) -> Any:
        """The placement step: ``obj`` with every tensor in it on :attr:`device`. Dicts, lists,
        tuples and dataclasses are rebuilt around the moved tensors; anything else is returned
        as it is."""
        return _place(obj, self.device, non_blocking)

    def tensor(self, data: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A small tensor for a collective (a flag, a count), on the device the backend takes."""
        return torch.tensor(data, dtype=dtype, device=self.device)


def _place(obj: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        # non_blocking only helps from pinned memory; from pageable memory it is synchronous
        return obj.to(device, non_blocking=non_blocking and obj.is_pinned())
    if isinstance(obj, dict):
        return type(obj)((k, _place(v, device, non_blocking)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_place(v, device, non_blocking) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _place(getattr(obj, f.name), device, non_blocking)
                   for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


# -- the device ------------------------------------------------------------------------------


def nvidia_driver_version() -> Optional[str]:
    """The loaded NVIDIA kernel driver's version, or ``None`` when no driver is loaded."""
    proc = Path("/proc/driver/nvidia/version")
    if proc.is_file():
        match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9]+\.[0-9.]+)", proc.read_text())
        if match:
            return match.group(1)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.stdout.strip().splitlines()[:1]
    return first[0].strip() if out.returncode == 0 and first else None


def nvidia_gpus_present() -> bool:
    """Whether this node has NVIDIA GPUs (device files or a loaded driver), whatever torch says."""
    return Path("/proc/driver/nvidia/version").is_file() or any(Path("/dev").glob("nvidia[0-9]*"))


def cuda_unusable_reason(driver: Optional[str] = None) -> str:
    """Why torch cannot use CUDA here, in words a user can act on."""
    build = torch.version.cuda
    if build is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build; install the CUDA build "
                "(bash scripts/install_gpu.sh)")
    driver = driver if driver is not None else nvidia_driver_version()
    major = int(build.split(".")[0])
    need = _MIN_DRIVER.get(major)
    need_text = f" (CUDA {major} needs driver {need} or newer)" if need else ""
    if driver is None:
        return (f"torch {torch.__version__} is built for CUDA {build}{need_text}, but no NVIDIA driver "
                "is loaded on this node (no /proc/driver/nvidia/version, nvidia-smi fails)")
    if need and _version_tuple(driver) < _version_tuple(need):
        return (f"the NVIDIA driver {driver} is too old for torch {torch.__version__}, which is built for "
                f"CUDA {build}{need_text}: update the driver or install a torch built for an older CUDA")
    return (f"torch {torch.__version__} (CUDA {build}) reports no usable GPU although driver {driver} is "
            "loaded: check CUDA_VISIBLE_DEVICES and the GPUs Slurm gave this job (--gpus-per-node)")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


def resolve_device(setting: str = "auto", local_rank: Optional[int] = None) -> torch.device:
    """``cuda:LOCAL_RANK`` or ``cpu`` for the ``trainer.device`` setting.

    ``auto`` takes CUDA when torch can use it and the CPU only where the node has no NVIDIA GPU
    at all: a GPU node whose driver does not match the torch build fails here, with the reason,
    instead of running the CPU path (gloo and the CPU workarounds) and failing much later.
    ``cuda`` requires a usable GPU; ``cpu`` always runs on the CPU."""
    if setting not in DEVICE_SETTINGS:
        raise ValueError(f"device must be one of {list(DEVICE_SETTINGS)}, got {setting!r}")
    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
        count = torch.cuda.device_count()
        if rank >= count:
            raise PlatformError(f"LOCAL_RANK {rank} but only {count} GPU(s) are visible: start one process per GPU")
        return torch.device("cuda", rank)
    if setting == "cuda" or nvidia_gpus_present():
        hint = "" if setting == "cuda" else " (trainer.device=cpu runs on the CPU anyway)"
        raise PlatformError(f"device={setting}: CUDA is not usable: {cuda_unusable_reason()}{hint}")
    return torch.device("cpu")


# -- the layer implementation ----------------------------------------------------------------


def importable_layer_implementation() -> tuple[str, str]:
    """``(impl, reason)``: transformer-engine where megatron itself can import it here, megatron's
    local spec otherwise, whatever the device (``plan`` and ``submit`` run on login nodes).

    Decided from megatron's own import (``gpt_layer_specs.HAVE_TE``), not from whether a
    ``transformer_engine`` package is on the path: an installed but unimportable TE (an ABI
    mismatch, the core without its torch extension) sets ``HAVE_TE = False`` there, and asking
    for the TE spec then fails with ``NameError: TESpecProvider``."""
    if importlib.util.find_spec("transformer_engine") is None:
        return "local", "transformer-engine is not installed"
    broken = hide_unimportable_transformer_engine()
    if broken:
        return "local", f"transformer-engine is installed but does not import: {broken}"
    from megatron.core.models.gpt import gpt_layer_specs

    if not getattr(gpt_layer_specs, "HAVE_TE", False):
        return "local", "megatron-core could not import its transformer-engine extension"
    return "transformer_engine", "megatron-core imports transformer-engine"


_TE_MODULES = ("transformer_engine", "transformer_engine.pytorch", "transformer_engine_torch")
_te_probe: Optional[str] = None  # None: not probed; "": imports; else why it does not


def hide_unimportable_transformer_engine() -> str:
    """Probes ``import transformer_engine.pytorch`` once; when it fails, makes transformer-engine
    look absent (``sys.modules[name] = None``: a later import raises ModuleNotFoundError) and
    returns why it failed ("" when it imports).

    Works around ``megatron.core.tensor_parallel.random`` (megatron-core 0.16), which guards
    its transformer-engine import with ``except ModuleNotFoundError`` only: an installed TE that
    raises another ImportError (an ABI mismatch, the core without its torch extension) makes
    ``import megatron.core`` itself fail. Absent, TE is skipped by every megatron module and the
    local spec is used. Call before megatron is imported."""
    global _te_probe
    if _te_probe is None:
        try:
            importlib.import_module("transformer_engine.pytorch")
            _te_probe = ""
        except ModuleNotFoundError as exc:
            _te_probe = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - any failure of the import means: not usable
            _te_probe = f"{type(exc).__name__}: {exc}"
        if _te_probe:
            import sys

            for name in [m for m in sys.modules if m.split(".")[0] in _TE_MODULES] + list(_TE_MODULES):
                sys.modules[name] = None  # type: ignore[assignment]
    return _te_probe


def layer_implementation(device: torch.device) -> tuple[str, str]:
    """``(impl, reason)`` for a process on ``device``: transformer-engine needs CUDA. The probe
    runs whatever the device, so that a broken TE is hidden before megatron is imported."""
    impl, reason = importable_layer_implementation()
    if device.type != "cuda":
        return "local", "transformer-engine needs CUDA"
    return impl, reason


def _fused_softmax_available(device: torch.device) -> bool:
    # megatron's fused masked softmax calls kernels that apex / Megatron-LM builds; without them
    # the local attention spec would fail on a GPU (transformer-engine's attention ignores it)
    return device.type == "cuda" and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None


# -- the process ----------------------------------------------------------------------------

_lock = threading.Lock()
_current: Optional[Platform] = None


def detect_platform(setting: str = "auto", local_rank: Optional[int] = None) -> Platform:
    """What this process would run on, without changing anything."""
    device = resolve_device(setting, local_rank)
    impl, reason = layer_implementation(device)
    return Platform(device=device, backend="nccl" if device.type == "cuda" else "gloo", layer_impl=impl,
                    layer_reason=reason, fused_softmax=_fused_softmax_available(device))


def init_platform(setting: str = "auto", local_rank: Optional[int] = None) -> Platform:
    """Decides the platform for this process (once; a second call must agree), makes its GPU
    the current device and applies the CPU workarounds on the CPU."""
    global _current
    with _lock:
        platform = detect_platform(setting, local_rank)
        # before megatron-core and vLLM are imported: several of their known warnings come at import
        quiet_known_noise(cpu=not platform.is_cuda)
        if _current is not None and _current.device != platform.device:
            raise PlatformError(f"this process already runs on {_current.device}, not {platform.device}")
        if platform.is_cuda:
            torch.cuda.set_device(platform.device)
        else:
            from megatron_cegppo.cpu_compat import apply_cpu_compat

            apply_cpu_compat()
        from megatron_cegppo.cpu_compat import allow_sequence_parallel_torch_norm

        if platform.layer_impl == "local":
            allow_sequence_parallel_torch_norm()
        _current = platform
        return platform


_detected: Optional[Platform] = None


def current_platform() -> Platform:
    """The process's platform: what :func:`init_platform` decided, or (before that, e.g. in a
    test that sets megatron up itself) what ``auto`` detects, without applying anything."""
    global _detected
    if _current is not None:
        return _current
    if _detected is None:
        _detected = detect_platform("auto")
    return _detected


def init_process_group(platform: Platform, timeout_minutes: float = 30.0) -> None:
    """The default process group from torchrun's environment, on the platform's backend."""
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        return
    kwargs = {"device_id": platform.device} if platform.is_cuda else {}
    dist.init_process_group(platform.backend, timeout=timedelta(minutes=timeout_minutes), **kwargs)


# -- the process groups ---------------------------------------------------------------------
# Here rather than in trainer/: the export (checkpoint/) and the trainer both set them up,
# and checkpoint/ is beneath trainer/.


@dataclass(frozen=True)
class Layout:
    world: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    dp_group: object
    is_last_stage: bool
    rollout_tp: int
    platform: Platform

    @property
    def device(self) -> torch.device:
        return self.platform.device

    @property
    def rollout_group(self) -> int:
        """Index of this rank's vLLM engine group (ranks rollout_tp * g ... share one engine)."""
        return self.rank // self.rollout_tp

    @property
    def rollout_groups(self) -> int:
        return self.world // self.rollout_tp

    @property
    def rollout_leader(self) -> bool:
        return self.rank % self.rollout_tp == 0


def init_distributed(cfg: Config) -> Layout:
    """Starts the default process group from torchrun's environment (a single process without
    one) and megatron's tensor/pipeline/data-parallel groups."""
    exit_with_launcher()  # a rank (and its children) must not outlive torchrun
    platform = init_platform(cfg.trainer.device)  # before megatron is imported
    import torch.distributed as dist
    from megatron.core import parallel_state

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # a process started without torchrun has no rendezvous port: torch's default (29500), moved
    # by the pid so that several such processes on one host do not take the same port
    os.environ.setdefault("MASTER_PORT", str(SOLO_MASTER_PORT_BASE + os.getpid() % SOLO_MASTER_PORT_SPREAD))
    init_process_group(platform)
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor, pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
    )
    return Layout(
        world=dist.get_world_size(), rank=dist.get_rank(), tp=p.tensor, pp=p.pipeline,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_group=parallel_state.get_data_parallel_group(),
        is_last_stage=parallel_state.is_pipeline_last_stage(),
        rollout_tp=cfg.rollout.tensor_parallel,
        platform=platform,
    )
