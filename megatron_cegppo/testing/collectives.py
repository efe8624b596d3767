"""Which devices the tensors of torch.distributed collectives live on.

On a GPU node the process groups are NCCL, which accepts CUDA tensors only ("No backend type
associated with device type cpu"), while gloo on the CPU takes anything: a CPU test cannot
see a collective of the wrong device unless it checks for one. :class:`CollectiveAudit` wraps
the collectives, records each tensor's device and raises on a device the backend being
emulated refuses. With ``emulate_single_rank`` it performs a world-of-one collective itself
(identity, or a copy into the output), so that it also works on fake CUDA tensors
(``torch._subclasses.fake_tensor.FakeTensorMode``), which no real backend can take.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_IN_PLACE = ("all_reduce", "broadcast", "reduce")
_GATHER_LIST = ("all_gather",)
_INTO_TENSOR = ("all_gather_into_tensor", "reduce_scatter_tensor", "_all_gather_base", "_reduce_scatter_base")
_ALL = _IN_PLACE + _GATHER_LIST + _INTO_TENSOR


class CollectiveDeviceError(AssertionError):
    pass


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


class CollectiveAudit:
    def __init__(self, accepts: set[str], *, emulate_single_rank: bool = False):
        self.accepts = set(accepts)
        self.emulate = emulate_single_rank
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self._saved: dict[str, Any] = {}

    def _wrap(self, name: str, upstream):
        audit = self

        def collective(*args, **kwargs):
            devices = tuple(str(t.device) for t in _tensors(list(args) + list(kwargs.values())))
            audit.calls.append((name, devices))
            bad = [d for d in devices if torch.device(d).type not in audit.accepts]
            if bad:
                raise CollectiveDeviceError(f"{name} of a tensor on {bad[0]}: the backend takes {sorted(audit.accepts)}")
            if not audit.emulate:
                return upstream(*args, **kwargs)
            group = kwargs.get("group")
            if dist.get_world_size(group) != 1:
                raise RuntimeError("emulate_single_rank needs groups of one rank")
            if name in _GATHER_LIST:
                args[0][0].copy_(args[1])
            elif name in _INTO_TENSOR:
                args[0].copy_(args[1])
            return None

        collective.__wrapped__ = upstream
        return collective

    def __enter__(self) -> "CollectiveAudit":
        for name in _ALL:
            upstream = getattr(dist, name, None)
            if upstream is not None:
                self._saved[name] = upstream
                setattr(dist, name, self._wrap(name, upstream))
        return self

    def __exit__(self, *exc) -> None:
        for name, upstream in self._saved.items():
            setattr(dist, name, upstream)
        self._saved.clear()
