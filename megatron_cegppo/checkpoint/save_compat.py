"""A save that a stop signal does not break.

megatron-core 0.16's ``dist_checkpointing`` writes each rank's shards in forked writer
processes and collects their results through one queue per rank, served by a ``spawn``
``multiprocessing`` Manager (``megatron.core.dist_checkpointing.strategies.filesystem_async.
_get_write_results_queue``). That server runs in the rank's process group with default signal
handling. torchrun stops its workers with ``killpg(SIGTERM)`` (its ``SubprocessHandler.close``;
the ranks are session leaders), so a stop signal kills the server: the save in progress dies
with BrokenPipeError and every later save fails too, although the rank itself only records the
request and would save and stop.

:func:`install_results_queue` puts a queue served by a Manager that ignores SIGTERM and SIGINT
in that module's place before the first save. The server still goes with its rank: the
Manager's own shutdown at exit, or, when the rank is killed, the parent watchdog of
:mod:`megatron_cegppo.lifeline`. ``tests/distributed/checkpoint/test_stop_during_save.py``
fails without it.
"""

from __future__ import annotations

import signal
import threading

_lock = threading.Lock()
_server = None  # the Manager behind the installed queue, kept referenced for the process's life


def _serve_through_stop_signals() -> None:
    """The Manager server's initializer (module level: the server is spawned)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from megatron_cegppo.lifeline import exit_with_parent

    exit_with_parent()


def install_results_queue() -> None:
    """Idempotent; call before the first ``dist_checkpointing.save`` of the process."""
    global _server
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    with _lock:
        if filesystem_async._results_queue is not None:
            return
        _server = SyncManager(ctx=mp.get_context("spawn"))  # what upstream's ctx.Manager() makes
        _server.start(initializer=_serve_through_stop_signals)
        filesystem_async._results_queue = _server.Queue()
