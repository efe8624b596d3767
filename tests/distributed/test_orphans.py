"""No rank outlives torchrun, no child outlives its rank. torchrun starts every rank in a
session of its own, so a kill -9 of torchrun reaches none of them: each rank's lifeline
(set up by ``init_distributed``) ends it within seconds, and the children it forked (as
dist_checkpointing's writers are) die with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_cegppo.testing.leaks import still_running
from megatron_cegppo.testing.multiprocess import free_port

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300
EXIT_WITHIN_S = 10.0

# A rank: the trainer's process-group set-up on the tiny CPU config, one forked child, then
# nothing but waiting (a training loop as far as the lifeline is concerned).
RANK = """
import json, multiprocessing as mp, os, sys, time
from megatron_cegppo.config.loader import load_config
from megatron_cegppo.trainer.distributed import init_distributed

layout = init_distributed(load_config(sys.argv[1], ["trainer.device=cpu"]))
child = mp.get_context("fork").Process(target=time.sleep, args=(600,))
child.start()
path = os.path.join(sys.argv[2], f"rank{layout.rank}.json")
with open(path + ".tmp", "w") as f:
    json.dump({"rank": os.getpid(), "child": child.pid}, f)
os.replace(path + ".tmp", path)
time.sleep(600)
"""


def _launch(tmp_path) -> tuple[subprocess.Popen, dict]:
    """torchrun with 2 ranks; returns it and ``{rank: {"rank": pid, "child": pid}}``."""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={free_port()}",
           str(script), str(ROOT / "configs" / "tiny_cpu.yaml"), str(tmp_path)]
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    log.close()
    end = time.time() + START_TIMEOUT_S
    while not all((tmp_path / f"rank{r}.json").exists() for r in (0, 1)):
        if proc.poll() is not None or time.time() > end:
            proc.kill()
            proc.wait()
            pytest.fail(f"the ranks did not start:\n{(tmp_path / 'log.txt').read_text()[-3000:]}")
        time.sleep(0.1)
    return proc, {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}


def _pids(ranks: dict) -> list[int]:
    return [pid for r in ranks.values() for pid in (r["rank"], r["child"])]


def test_kill_9_of_torchrun_ends_its_ranks(tmp_path):
    proc, ranks = _launch(tmp_path)
    proc.kill()  # torchrun alone: the ranks are in sessions of their own
    proc.wait()
    t0 = time.monotonic()
    alive = still_running(_pids(ranks), EXIT_WITHIN_S)
    assert alive == [], f"outlived torchrun: {alive} of {ranks}"
    print(f"ranks and their children gone {time.monotonic() - t0:.2f} s after torchrun")
    log = (tmp_path / "log.txt").read_text()
    for r in ranks.values():  # each rank said why it went, on the stderr it shares with torchrun
        assert f"[lifeline] pid {r['rank']}: parent {proc.pid} exited" in log, log[-3000:]


def test_kill_9_of_a_rank_takes_its_children(tmp_path):
    proc, ranks = _launch(tmp_path)
    try:
        os.kill(ranks[0]["rank"], signal.SIGKILL)
        t0 = time.monotonic()
        assert still_running([ranks[0]["child"]], EXIT_WITHIN_S) == [], "a forked child outlived its rank"
        print(f"rank 0's child gone {time.monotonic() - t0:.2f} s after it")
        proc.wait(timeout=120)  # torchrun sees the failure and stops rank 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert still_running(_pids(ranks), EXIT_WITHIN_S) == [], ranks
