"""Every random number generator a rank draws from, captured and restored, so that a resumed
run samples and initialises exactly as the uninterrupted one would. Only tensors and plain
values: loadable with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import random

import numpy as np
import torch

from megatron_cegppo.platform import current_platform


def capture_rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "megatron_tracker": dict(get_cuda_rng_tracker().get_states()),
    }
    if current_platform().is_cuda:
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))
    get_cuda_rng_tracker().set_states(state["megatron_tracker"])
    if "cuda" in state and current_platform().is_cuda:
        torch.cuda.set_rng_state(state["cuda"])
