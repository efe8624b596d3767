"""Runs a function in ``world_size`` real processes joined by a gloo process group.

Used by the parallel tests: each rank runs ``fn(rank, world_size, *args)`` after
``torch.distributed.init_process_group("gloo")``; the parent gets every rank's return value
(anything ``torch.save`` can write), or one error carrying the failing ranks' tracebacks.

The ranks are forked from a forkserver that has imported torch and megatron-core once (a
fresh interpreter importing them takes 10-20 s on two busy cores, per rank, per test). Each
rank is still a new process with a pristine megatron (nothing is patched or initialised in
the server); it takes the caller's environment of the moment and writes its output to a file
that the caller prints, so a test's captured output holds its ranks' output.
"""

from __future__ import annotations

import io
import os
import queue as queue_mod
import sys
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_cegppo.netutil import free_port  # noqa: F401 (imported from here by tests)


def _serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _deserialize(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


# imported once in the forkserver; nothing here may patch or initialise anything at import
PRELOAD = ("torch", "torch.distributed", "megatron.core.parallel_state", "megatron.core.tensor_parallel",
           "megatron.core.models.gpt", "megatron.core.distributed", "megatron.core.optimizer",
           "megatron.core.pipeline_parallel", "megatron.core.dist_checkpointing", "transformers")
_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(list(PRELOAD))
    return _CONTEXT


def _worker(fn, rank, world_size, port, args, results, threads, environ, log_path, caller):
    # the forkserver's environment is the one of its start; the caller's is the one that counts
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    torch.set_num_threads(threads)
    from megatron_cegppo.lifeline import exit_with_parent, exit_with_process

    # a killed test runner takes its ranks with it (their parent is the forkserver, which
    # lives on while they hold its pipe), and so does a dead forkserver
    exit_with_process(caller)
    exit_with_parent()
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        results.put((rank, True, _serialize(value)))
    except BaseException:  # noqa: BLE001 - reported to the parent whatever it is
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _print_and_remove(path: str) -> None:
    try:
        with open(path, errors="replace") as f:
            text = f.read()
        os.unlink(path)
    except OSError:
        return
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600.0
) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; returns the
    per-rank results in rank order. ``fn`` must be importable (a module-level function)."""
    ctx = _context()
    results = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="cegppo-ranks-", suffix=".log", delete=False)
    log.close()
    procs = [
        ctx.Process(target=_worker,
                    args=(fn, r, world_size, port, args, results, threads, dict(os.environ), log.name, os.getpid()))
        for r in range(world_size)
    ]
    outcomes: dict[int, tuple[bool, Any]] = {}
    try:
        for p in procs:
            p.start()
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
            if p.pid is None:
                continue  # never started
            p.join(timeout=5 if len(outcomes) == world_size else 1)
            if p.is_alive():
                p.kill()
                p.join()
        _print_and_remove(log.name)
    failures = {r: tb for r, (ok, tb) in outcomes.items() if not ok}
    if failures:
        report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        raise RuntimeError(f"{fn.__name__} failed on rank(s) {sorted(failures)}:\n{report}")
    return [_deserialize(outcomes[r][1]) for r in range(world_size)]
