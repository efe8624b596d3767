"""Workarounds that let megatron-core 0.16 run on a machine without CUDA (torch CPU + gloo).

Every patch here names the upstream function it stands in for. They are applied by
:func:`apply_cpu_compat`, which ``megatron_cegppo.platform`` calls only for a process that runs
on the CPU, so the same model, schedule and optimizer code runs natively on a GPU. ``tests/distributed/parallel/test_cpu_compat.py`` shows, for
each patch, that megatron fails without it and works with it.

The one patch that is not about CUDA, :func:`allow_sequence_parallel_torch_norm`, is applied
whenever megatron builds its torch-native norm (no transformer-engine / apex), CPU or GPU.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

import torch

from megatron_cegppo.patching import patch_once

# Modules that create tensors with a hard-coded ``device="cuda"`` on paths we use:
#   pipeline_parallel.schedules: forward_backward_no_pipelining / _with_interleaving /
#     _without_interleaving (``total_num_tokens = torch.zeros(..., device="cuda")``)
#   optimizer.optimizer: MixedPrecisionOptimizer.__init__ / FP32Optimizer (found_inf, _scale)
#   optimizer.clip_grads: get_grad_norm_fp32, clip_grad_by_total_norm_fp32, count_zeros_fp32
#   optimizer.grad_scaler: ConstantGradScaler / DynamicGradScaler
#   utils: get_model_config helpers, check_param_hashes_across_dp_replicas, ...
#   dist_checkpointing.exchange_utils / strategies.state_dict_saver: shard exchange on save
#   tensor_parallel.data: broadcast_data
#   rerun_state_machine: RerunStateMachine bookkeeping tensors
_CUDA_HARDCODED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.utils",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.tensor_parallel.data",
    "megatron.core.rerun_state_machine",
    "megatron.core.transformer.utils",
)

_TENSOR_FACTORIES = frozenset(
    {"zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
     "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor"}
)


def _to_cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _CpuRoutedTorch(types.ModuleType):
    """Stands in for ``torch`` inside one megatron module: tensor factories asked for a CUDA
    device get the CPU instead (``pin_memory`` dropped: it needs CUDA too)."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name not in _TENSOR_FACTORIES:
            return attr

        def factory(*args: Any, **kwargs: Any) -> Any:
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            kwargs.pop("pin_memory", None)
            return attr(*args, **kwargs)

        factory.__name__ = name
        return factory


def _cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Replaces ``megatron.core.tensor_parallel.random._get_cuda_rng_state``: the CPU
    generator plays the role of the device generator."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """Replaces ``megatron.core.tensor_parallel.random._set_cuda_rng_state``."""
    torch.set_rng_state(new_state)


class _CpuCudaNamespace(types.ModuleType):
    """Stands in for ``torch.cuda`` inside ``megatron.core.tensor_parallel.random``:
    ``CudaRNGStatesTracker.add`` and ``model_parallel_cuda_manual_seed`` call
    ``torch.cuda.get_rng_state`` / ``torch.cuda.manual_seed`` directly. Without this the RNG
    tracker (forked by every attention forward for dropout) cannot be seeded."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))


class _TorchWithCpuCuda(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCudaNamespace()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _patch_once(name: str, fn) -> None:
    patch_once(f"megatron.cpu_compat.{name}", fn)


def _patch_current_device() -> None:
    # torch.cuda.current_device: ~175 megatron call sites pass it as ``device=`` (RoPE
    # ``inv_freq``, tensor_parallel.mappings._gather_along_first_dim, layer weights, ...).
    torch.cuda.current_device = lambda: torch.device("cpu")


def _patch_synchronize() -> None:
    # torch.cuda.synchronize: called by pipeline_parallel.p2p_communication._communicate
    # after every send/recv; nothing to wait for on the CPU.
    torch.cuda.synchronize = lambda device=None: None


def _patch_tensor_cuda() -> None:
    # Tensor.cuda: used by megatron's tied-embedding sync across pipeline stages
    # (LanguageModule.setup_embeddings_and_output_layer) and optimizer state moves.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def _patch_rng() -> None:
    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    random_mod._get_cuda_rng_state = _cpu_rng_state
    random_mod._set_cuda_rng_state = _set_cpu_rng_state
    random_mod.torch = _TorchWithCpuCuda()


def _patch_hardcoded_cuda_modules() -> None:
    proxy = _CpuRoutedTorch()
    for name in _CUDA_HARDCODED_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _with_cuda_type_names(fn):
    """Runs ``fn`` with ``Tensor.type()`` answering CUDA type names for CPU float tensors:
    the functions wrapped below only use the name to tell fp32 from fp16/bf16."""
    upstream_type = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = upstream_type(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return upstream_type(self, dtype, non_blocking, **kwargs)

    def wrapped(*args, **kwargs):
        torch.Tensor.type = type_
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = upstream_type

    wrapped.__wrapped__ = fn
    return wrapped


def _patch_cuda_type_checks() -> None:
    # megatron.core.optimizer.distrib_optimizer.DistributedOptimizer
    #   ._build_model_and_main_param_groups raises unless params are 'torch.cuda.*Tensor';
    # megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32 asserts
    #   grad.type() == 'torch.cuda.FloatTensor'.
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    cls = distrib_optimizer.DistributedOptimizer
    cls._build_model_and_main_param_groups = classmethod(
        _with_cuda_type_names(cls._build_model_and_main_param_groups.__func__)
    )
    wrapped_clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = wrapped_clip
    optimizer.clip_grad_by_total_norm_fp32 = wrapped_clip


def allow_sequence_parallel_torch_norm() -> None:
    """Replaces ``megatron.core.transformer.torch_norm.WrappedTorchNorm.__new__``, which
    asserts ``not config.sequence_parallel``. A norm is per-token, so under sequence parallel
    it is correct as long as its parameters' gradients are summed over the tensor-parallel
    group: megatron's ``finalize_model_grads`` does that for parameters flagged
    ``sequence_parallel`` (as transformer-engine's norms are)."""

    def patch() -> None:
        from megatron.core.transformer import torch_norm

        upstream_new = torch_norm.WrappedTorchNorm.__new__

        def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
            sequence_parallel = config.sequence_parallel
            if sequence_parallel:
                config.sequence_parallel = False  # only to get past upstream's assertion
                try:
                    norm = upstream_new(cls, config, hidden_size, eps, **kwargs)
                finally:
                    config.sequence_parallel = True
            else:
                norm = upstream_new(cls, config, hidden_size, eps, **kwargs)
            for param in norm.parameters():
                param.sequence_parallel = sequence_parallel
            return norm

        torch_norm.WrappedTorchNorm.__new__ = staticmethod(__new__)

    _patch_once("sequence_parallel_torch_norm", patch)


_CPU_PATCHES = {
    "current_device": _patch_current_device,
    "synchronize": _patch_synchronize,
    "tensor_cuda": _patch_tensor_cuda,
    "rng": _patch_rng,
    "hardcoded_cuda_modules": _patch_hardcoded_cuda_modules,
    "cuda_type_checks": _patch_cuda_type_checks,
}
PATCH_NAMES = ("sequence_parallel_torch_norm",) + tuple(_CPU_PATCHES)


def apply_cpu_compat(exclude: tuple[str, ...] = ()) -> bool:
    """Applies every CPU workaround (the platform calls it for CPU processes). Idempotent.

    ``exclude`` names patches to leave out (the tests use it to show each one is needed).
    Returns whether the CPU workarounds are in effect."""
    unknown = set(exclude) - set(PATCH_NAMES)
    if unknown:
        raise ValueError(f"unknown patch name(s) {sorted(unknown)}; known: {list(PATCH_NAMES)}")
    if "sequence_parallel_torch_norm" not in exclude:
        allow_sequence_parallel_torch_norm()
    for name, patch in _CPU_PATCHES.items():
        if name not in exclude:
            _patch_once(name, patch)
    return True
