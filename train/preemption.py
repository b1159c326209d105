"""Stopping on SIGTERM, which preemptible TPU VMs, SLURM and Kubernetes send before they kill a job: the run
finishes the step in flight, writes a checkpoint and exits, and on several hosts all of them stop after the
same step (JAX's preemption sync point, which ``jax.distributed.initialize`` arms for SIGTERM)."""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
    """Whether a SIGTERM has asked the run to stop; ask once per step, with that step's number."""

    def __init__(self) -> None:
        self.multihost = jax.process_count() > 1
        self.signalled = False
        self._previous = None
        if not self.multihost and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True

    def reached(self, step: int) -> bool:
        """True when the run should stop after ``step``: the same answer on every host."""
        if self.multihost:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signalled

    def close(self) -> None:
        """Give SIGTERM back its previous handler."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
