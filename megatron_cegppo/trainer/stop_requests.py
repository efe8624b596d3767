"""When the run stops early, agreed by every rank: a signal (SIGTERM is Slurm's preemption or
cancellation, followed by SIGKILL after the grace time; SIGUSR1 the batch script's warning), a
``STOP`` file in the run directory (what the batch script writes: it reaches every rank
without crossing srun and torchrun), or a job time limit closer than one more step and a save."""

from __future__ import annotations

import signal
from typing import Optional

from megatron_cegppo.platform import Layout
from megatron_cegppo.trainer.collectives import any_rank
from megatron_cegppo.trainer.stopping import StopClock, stop_file_present, stop_file_urgent


class StepAbandoned(Exception):
    """A step given up before its update because the job is being preempted."""


class StopRequests:
    def __init__(self, layout: Layout, run_dir: str, clock: Optional[StopClock] = None):
        self.layout, self.run_dir, self.clock = layout, run_dir, clock
        self.reporting = layout.rank == 0
        self.requested = False
        self.preempted = False
        self.reason: Optional[str] = None  # this rank's, at the last :meth:`agreed`

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self.handle)

    def handle(self, signum=None, _frame=None) -> None:
        """Signal handler: stop at the end of the current step after saving; on SIGTERM sooner,
        see :meth:`abandon_if_preempted`."""
        self.requested = True
        if signum == signal.SIGTERM:
            self.preempted = True

    def abandon_if_preempted(self, step: int) -> None:
        """Raises :class:`StepAbandoned` when any rank was preempted (SIGTERM, or the ``STOP``
        file saying so). Called before the step's first optimizer step, where giving the step up
        loses its rollouts only: the state at the end of the previous step is saved at once,
        instead of after the rest of a step that can take longer than the grace time. Every rank
        calls it at the same points."""
        urgent = self.preempted or (self.reporting and stop_file_urgent(self.run_dir))
        if any_rank(self.layout, urgent):
            raise StepAbandoned(step)

    def own_reason(self) -> Optional[str]:
        """Why this rank would stop now (the ``STOP`` file and the clock are rank 0's to read)."""
        if self.requested:
            return "requested"
        if not self.reporting:
            return None
        if stop_file_present(self.run_dir):
            return "requested"
        return self.clock.should_stop() if self.clock is not None else None

    def agreed(self) -> bool:
        """Whether any rank has a reason to stop (every rank calls it at the end of a step)."""
        self.reason = self.own_reason()
        return any_rank(self.layout, self.reason is not None)
