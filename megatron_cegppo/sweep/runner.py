"""Runs a sweep's runs one after another, each as the user would start it (``torchrun ...
megatron-cegppo train``, or one process), and picks up where a killed sweep stopped: a run
with its ``SWEEP_DONE.json`` is skipped, an unfinished one resumes from its own checkpoints.

The children die with the sweep (the kernel's parent-death signal on the launcher, whose ranks
watch it in turn). A stop signal (SIGTERM, SIGINT, SIGUSR1) is passed to the running run,
which saves and stops; the sweep then stops too, its next start resuming that run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_cegppo.fsutil import atomic_write_text
from megatron_cegppo.netutil import free_port
from megatron_cegppo.sweep.plan import SweepRun

DONE = "SWEEP_DONE.json"
LOG = "sweep_train.log"
EXIT_STOPPED = 3  # as megatron-cegppo train's
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@dataclass
class RunOutcome:
    run: SweepRun
    status: str  # done | skipped | stopped | failed
    wall_s: float
    returncode: Optional[int] = None


def train_command(config: str, run: SweepRun, nproc: int, port: int) -> list[str]:
    target = ["-m", "megatron_cegppo.cli", "train", "--config", config, *run.overrides]
    if nproc == 1:
        return [sys.executable, *target]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            f"--master-port={port}", *target]


def is_done(run: SweepRun) -> bool:
    return (run.run_dir / DONE).is_file()


class SweepRunner:
    def __init__(self, config: str, runs: Sequence[SweepRun], *, nproc: int = 1, log: Callable = print,
                 after_run: Optional[Callable[[], None]] = None):
        """``after_run``: called after every finished run (the summary is rewritten there)."""
        self.config, self.runs, self.nproc, self.log = config, list(runs), nproc, log
        self.after_run = after_run
        self._child: Optional[subprocess.Popen] = None
        self._stop: Optional[int] = None

    def run(self) -> list[RunOutcome]:
        """Every run not yet done, in order; stops at the first that fails or is stopped."""
        outcomes = []
        previous = {sig: signal.signal(sig, self._forward) for sig in STOP_SIGNALS}
        try:
            for i, run in enumerate(self.runs, 1):
                where = f"[sweep {i}/{len(self.runs)}] {run.label}"
                if is_done(run):
                    self.log(f"{where}: done earlier, skipped ({run.run_dir})")
                    outcomes.append(RunOutcome(run, "skipped", 0.0))
                    continue
                if self._stop is not None:
                    break
                outcome = self._run_one(run, where)
                outcomes.append(outcome)
                if outcome.status != "done":
                    break
                if self.after_run is not None:
                    self.after_run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return outcomes

    def _run_one(self, run: SweepRun, where: str) -> RunOutcome:
        from megatron_cegppo.lifeline import dies_with_this_process
        from megatron_cegppo.trainer.stopping import clear_stopped_marker, read_stopped_marker

        run.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run.run_dir / LOG
        resuming = (run.run_dir / "checkpoints").is_dir()
        self.log(f"{where}: {'resuming' if resuming else 'starting'} in {run.run_dir} (log: {log_path})")
        clear_stopped_marker(run.run_dir)  # the trainer's own start clears it too, but may fail before
        start = time.perf_counter()
        with open(log_path, "a") as out:
            out.write(f"\n=== sweep: {' '.join(train_command(self.config, run, self.nproc, 0))}\n")
            out.flush()
            self._child = subprocess.Popen(
                train_command(self.config, run, self.nproc, free_port()), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=dies_with_this_process(),
                env=dict(os.environ, CEGPPO_PROGRESS="0"))
            code = self._wait()
        self._child = None
        wall = time.perf_counter() - start
        spent = _add_wall_time(run.run_dir, wall)
        # stopped: the trainer saved and wrote its marker (torchrun turns the exit status 3 into 1)
        stopped = read_stopped_marker(run.run_dir) is not None or code == EXIT_STOPPED
        if code == 0 and not stopped:
            atomic_write_text(run.run_dir / DONE, json.dumps({"wall_s": spent, "finished": time.time()}) + "\n")
            self.log(f"{where}: done in {wall:.0f} s{_brief(run.run_dir)}")
            return RunOutcome(run, "done", spent, code)
        if stopped:
            self.log(f"{where}: stopped after {wall:.0f} s (saved: the next sweep resumes it)")
            return RunOutcome(run, "stopped", spent, code)
        self.log(f"{where}: failed with exit status {code} after {wall:.0f} s; the sweep stops here. "
                 f"Its log: {log_path}\n{_tail(log_path)}")
        return RunOutcome(run, "failed", spent, code)

    def _wait(self) -> int:
        while True:
            try:
                return self._child.wait()
            except InterruptedError:  # a signal arrived; wait on
                continue

    def _forward(self, signum, frame) -> None:
        """A stop signal: the running run saves and stops; no run starts after it."""
        self._stop = signum
        if self._child is not None and self._child.poll() is None:
            try:
                os.killpg(self._child.pid, signal.SIGTERM if signum == signal.SIGINT else signum)
            except ProcessLookupError:
                pass


def _add_wall_time(run_dir: Path, seconds: float) -> float:
    """The run's wall time over every start the sweep gave it (killed starts are not counted)."""
    path = run_dir / "sweep_wall_time.json"
    total = seconds + (json.loads(path.read_text())["wall_s"] if path.is_file() else 0.0)
    atomic_write_text(path, json.dumps({"wall_s": total}) + "\n")
    return total


def _brief(run_dir: Path) -> str:
    from megatron_cegppo.tracking.metrics import read_metrics

    records = [r for r in read_metrics(run_dir) if r.get("step", -1) >= 0]
    if not records:
        return ""
    first, last = records[0], records[-1]

    def show(key):
        a, b = first.get(key), last.get(key)
        return f"{key} {a:.3f} -> {b:.3f}" if isinstance(a, float) and isinstance(b, float) else None

    parts = [p for p in (show("reward_mean"), show("entropy")) if p]
    return f": {', '.join(parts)}" if parts else ""


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in text)
