"""A free local TCP port for a rendezvous (torchrun's master port, a test's store). Torch-free,
so that the sweep, which only starts processes, can use it."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now (the OS's pick; another process may take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
