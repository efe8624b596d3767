"""Monkey-patches of upstream libraries (megatron-core, vLLM), each applied once per process.

A patch usually wraps the function it replaces; applied twice it would wrap its own wrapper.
Engines, optimizers and platforms are set up from several threads and call sites, so the
check and the patch happen under one lock.
"""

from __future__ import annotations

import threading
from typing import Callable

# reentrant: a patch may apply another patch it depends on
_lock = threading.RLock()
_applied: set[str] = set()


def patch_once(name: str, apply: Callable[[], None]) -> bool:
    """Runs ``apply`` unless the patch ``name`` (unique in the process, e.g.
    ``"vllm.cpu_shm_group_name"``) was applied already. A patch whose ``apply`` raises counts
    as not applied. Returns whether ``apply`` ran."""
    with _lock:
        if name in _applied:
            return False
        apply()
        _applied.add(name)
        return True
