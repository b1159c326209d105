"""The training command's errors: each message is one line that names the problem and the fix."""

from __future__ import annotations


class RunError(Exception):
    """A problem with the run's inputs; the message is one line that names the fix."""


class NonFiniteLoss(RunError):
    """The training loss became NaN or infinite; nothing after the last good checkpoint was saved."""


class DataError(Exception):
    """A dataset or image problem the user can fix; the message is always one line naming the problem and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class CheckpointError(RunError):
    """A training checkpoint or workdir that cannot be read; the message is one line naming the fix."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only); the message is one line naming the fix."""


class WorkdirError(Exception):
    """The workdir cannot be used (busy, not writable); the message is one line naming the fix."""


class Preempted(Exception):
    """The run stopped on SIGTERM after a checkpoint; rerunning the same command resumes it."""

    def __init__(self, step: int) -> None:
        super().__init__(f"preempted at step {step}: checkpoint written; rerun the same command to resume")
        self.step = step
