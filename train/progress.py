"""What the run prints: log lines on stdout (process 0) and a progress bar on stderr that counts finished steps."""

from __future__ import annotations

import collections
import sys
from typing import Any

import jax


class Progress:
    """A tqdm bar over the training steps, advanced as steps finish on the device (not as they are queued).

    JAX dispatches steps asynchronously, so the Python loop runs ahead of the accelerator; each step's output
    is kept until it is ready, and only then counted. :meth:`log` prints a line above the bar, never over it.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = None
        self.queued: collections.deque[tuple[int, Any]] = collections.deque()
        if enabled and jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def step_queued(self, step: int, output: Any) -> None:
        """Step ``step`` was dispatched; ``output`` (a jax.Array, or a pytree of them) is ready when it finishes."""
        if self.bar is not None:
            self.queued.append((step, jax.tree.leaves(output)[0]))
            self._count_finished()

    def show(self, **values: str) -> None:
        """Show ``values`` (loss, lr, ...) beside the bar."""
        if self.bar is not None:
            self._count_finished()
            self.bar.set_postfix(values)

    def close(self) -> None:
        """Count the steps still running as they finish, then close the bar (again: nothing)."""
        if self.bar is not None:
            while self.queued:
                step, out = self.queued.popleft()
                jax.block_until_ready(out)
                self.bar.update(step - self.bar.n)
            self.bar.close()
            self.bar = None

    def _count_finished(self) -> None:
        done = None
        while self.queued and self.queued[0][1].is_ready():
            done = self.queued.popleft()[0]
        if done is not None:
            self.bar.update(done - self.bar.n)


def log(msg: str) -> None:
    """Print a line on stdout on process 0; a progress bar on the terminal is cleared first and redrawn below it."""
    if jax.process_index() != 0:
        return
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()
