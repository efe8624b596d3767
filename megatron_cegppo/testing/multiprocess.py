"""Runs a function in ``world_size`` real processes joined by a gloo process group.

Used by the parallel tests: each rank runs ``fn(rank, world_size, *args)`` after
``torch.distributed.init_process_group("gloo")``; the parent gets every rank's return value
(anything ``torch.save`` can write), or one error carrying the failing ranks' tracebacks.
"""

from __future__ import annotations

import io
import os
import queue as queue_mod
import socket
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _deserialize(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(fn, rank, world_size, port, args, results, threads):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(threads)
    from megatron_cegppo.lifeline import exit_with_parent

    exit_with_parent()  # a killed test runner takes its ranks with it
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        results.put((rank, True, _serialize(value)))
    except BaseException:  # noqa: BLE001 - reported to the parent whatever it is
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600.0
) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; returns the
    per-rank results in rank order. ``fn`` must be importable (a module-level function)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, args, results, threads))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    try:
        while len(outcomes) < world_size:
            try:
                rank, ok, payload = results.get(timeout=timeout)
            except queue_mod.Empty:
                raise TimeoutError(
                    f"{fn.__name__}: ranks {sorted(set(range(world_size)) - set(outcomes))} "
                    f"gave no result within {timeout:.0f} s"
                ) from None
            outcomes[rank] = (ok, payload)
            if not ok:
                break  # the other ranks may be blocked in a collective with the failed one
    finally:
        for p in procs:
            p.join(timeout=5 if len(outcomes) == world_size else 1)
            if p.is_alive():
                p.kill()
                p.join()
    failures = {r: tb for r, (ok, tb) in outcomes.items() if not ok}
    if failures:
        report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        raise RuntimeError(f"{fn.__name__} failed on rank(s) {sorted(failures)}:\n{report}")
    return [_deserialize(outcomes[r][1]) for r in range(world_size)]
