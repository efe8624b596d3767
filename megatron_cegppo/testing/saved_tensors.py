"""Bytes that autograd keeps from forward to backward, measured with saved-tensor hooks: the
activation memory a model holds between its forward and backward passes, on any device."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch


class SavedBytes:
    """Unique storages saved for backward inside :meth:`record`, minus the excluded ones
    (parameters: they are held anyway). A storage saved several times, or through several
    views, counts once, whole."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, int] = {}

    @property
    def total(self) -> int:
        return sum(self._seen.values())

    @contextmanager
    def record(self) -> Iterator["SavedBytes"]:
        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._excluded and storage.nbytes():
                self._seen[ptr] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield self
