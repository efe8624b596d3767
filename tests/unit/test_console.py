"""The libraries' known noise is dropped from a run's output, exactly: each listed message
(the CPU-only ones on the CPU path only), and nothing else, not even another message of the
same logger. Run in a fresh interpreter: the filters are process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_cegppo.console import NOISE, PY_WARNING

PROBE = r'''
import json, logging, sys, warnings
from megatron_cegppo.console import NOISE, PY_WARNING, quiet_known_noise

cpu = sys.argv[1] == "cpu"
shown = []

class Keep(logging.Handler):
    def emit(self, record):
        shown.append(record.getMessage())

logging.getLogger().addHandler(Keep())
warnings.simplefilter("always")
quiet_known_noise(cpu=cpu)
with warnings.catch_warnings(record=True) as caught:  # keeps the filters: ours before "always"
    for i, noise in enumerate(NOISE):
        text = noise.pattern.replace("\\", "").replace("(reduce_scatter_tensor|all_gather_into_tensor)",
                                                      "reduce_scatter_tensor")
        if noise.source == PY_WARNING:
            warnings.warn(f"{text} (noise {i})")
        else:
            logging.getLogger(noise.source).warning(f"{text} (noise {i})")
            logging.getLogger(noise.source).warning(f"something real ({i})")
    warnings.warn("a real warning")
print(json.dumps({"warnings": [str(w.message) for w in caught], "logged": shown}))
'''


def _run(platform: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, platform], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_known_noise_goes_and_the_rest_stays(platform):
    seen = _run(platform)
    everything = seen["warnings"] + seen["logged"]
    for i, noise in enumerate(NOISE):
        dropped = platform == "cpu" or not noise.cpu_only
        assert any(f"(noise {i})" in m for m in everything) != dropped, (noise, everything)
        if noise.source != PY_WARNING:
            assert f"something real ({i})" in seen["logged"]  # the same logger's other messages
    assert "a real warning" in seen["warnings"]


def test_every_entry_says_where_and_why():
    for noise in NOISE:
        assert noise.why and (noise.source == PY_WARNING or noise.source.startswith("vllm."))
