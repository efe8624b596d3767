"""A patch of an upstream library runs once per process, whichever thread asks first."""

from __future__ import annotations

import threading
import uuid

import pytest

from megatron_cegppo.patching import patch_once


def test_a_patch_runs_once_across_threads():
    name, calls = f"test.{uuid.uuid4().hex}", []
    threads = [threading.Thread(target=patch_once, args=(name, lambda: calls.append(1))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]
    assert patch_once(name, lambda: calls.append(2)) is False and calls == [1]


def test_a_patch_that_raises_is_not_applied():
    name = f"test.{uuid.uuid4().hex}"

    def broken():
        raise RuntimeError("upstream moved")

    with pytest.raises(RuntimeError, match="upstream moved"):
        patch_once(name, broken)
    assert patch_once(name, lambda: None) is True


def test_a_patch_may_apply_the_one_it_needs():
    first, second = f"test.{uuid.uuid4().hex}", f"test.{uuid.uuid4().hex}"
    order = []
    patch_once(second, lambda: (patch_once(first, lambda: order.append(first)), order.append(second)))
    assert order == [first, second]
