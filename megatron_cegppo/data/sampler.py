"""Epoch-wise shuffled index stream whose position can be saved and resumed exactly."""

from __future__ import annotations

from typing import Any, Dict, List


class ShuffledSampler:
    """Indices ``0..num_items-1``; epoch ``e`` uses a permutation from a generator seeded
    with ``seed + e``, so the whole stream is a function of ``(seed, num_items)`` and the
    position alone, and resuming needs no RNG state."""

    def __init__(self, num_items: int, *, seed: int, shuffle: bool = True) -> None:
        if not isinstance(num_items, int) or num_items < 1:
            raise ValueError(f"num_items must be a positive int, got {num_items!r}")
        self.num_items, self.seed, self.shuffle = num_items, int(seed), bool(shuffle)
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        import torch  # here: the data package is read by the preflight, before torch starts

        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_items, generator=g).tolist()

    @property
    def consumed(self) -> int:
        return self.epoch * self.num_items + self.position

    def next_batch(self, n: int) -> List[int]:
        """The next ``n`` indices, continuing into the next epoch(s) when this one ends."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"batch size must be a non-negative int, got {n!r}")
        out: List[int] = []
        while len(out) < n:
            take = min(n - len(out), self.num_items - self.position)
            out.extend(self._order[self.position:self.position + take])
            self.position += take
            if self.position == self.num_items:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {
            "epoch": self.epoch, "position": self.position, "seed": self.seed,
            "num_items": self.num_items, "consumed": self.consumed, "shuffle": self.shuffle,
        }

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Continues exactly where the saved sampler stopped; the dataset size and seed
        (and shuffle, when saved) must match, since they define the stream."""
        missing = [k for k in ("epoch", "position", "num_items", "seed") if k not in sd]
        if missing:
            raise ValueError(f"sampler state is missing {missing}")
        for key in ("num_items", "seed", "shuffle"):
            if key in sd and sd[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={sd[key]!r} but this sampler has {key}={getattr(self, key)!r}"
                )
        epoch, position = int(sd["epoch"]), int(sd["position"])
        if epoch < 0 or not 0 <= position < self.num_items:
            raise ValueError(f"sampler state out of range: epoch={epoch}, position={position}")
        if "consumed" in sd and sd["consumed"] != epoch * self.num_items + position:
            raise ValueError(f"sampler state is inconsistent: consumed={sd['consumed']} but "
                             f"epoch*num_items+position={epoch * self.num_items + position}")
        self.epoch, self.position = epoch, position
        self._order = self._epoch_order(epoch)
