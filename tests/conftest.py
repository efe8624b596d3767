"""Every test, module and session fails when a process it started is still running after it
(a few seconds' grace); the leftovers are killed, so the next tests start clean, and named.
What counts as a scope's process, and the few helpers allowed to outlive it:
:mod:`megatron_cegppo.testing.leaks`."""

from __future__ import annotations

import pytest

from megatron_cegppo.testing import leaks

leaks.mark_runner()


def _check(snapshot: leaks.Snapshot, what: str) -> None:
    left = leaks.leftovers(snapshot)
    if left:
        pytest.fail(f"{len(left)} process(es) started by {what} outlived it (now killed):\n  "
                    + "\n  ".join(left), pytrace=False)


@pytest.fixture(autouse=True, scope="session")
def _no_process_outlives_the_session():
    snapshot = leaks.Snapshot.take()
    yield
    _check(snapshot, "the session's fixtures")


@pytest.fixture(autouse=True, scope="module")
def _no_process_outlives_the_module(request):
    snapshot = leaks.Snapshot.take()
    yield
    _check(snapshot, f"module {request.module.__name__} (its fixtures)")


@pytest.fixture(autouse=True)
def _no_process_outlives_the_test(request):
    snapshot = leaks.Snapshot.take()
    yield
    _check(snapshot, f"test {request.node.name}")
