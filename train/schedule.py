"""The order of a training run from any resume position: its training stretches, evaluations and checkpoints.

One :class:`Schedule` drives both the loop (``train.loop``) and the reader that reads its batches ahead
(``train.pipeline.RunData``), so the two cannot disagree on where an epoch ends or when the run evaluates.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """A stretch of a run's batches: training batches [start, stop) of ``epoch``, or one whole evaluation."""

    kind: str  # "train" | "val"
    epoch: int = 0
    start: int = 0
    stop: int = 0


@dataclass(frozen=True)
class Position:
    """Where a run stands, as its checkpoints record it: steps done, the epoch, and the next batch of that epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass(frozen=True)
class Stretch:
    """Training batches the loop runs without a pause (to an epoch end or the last step), and what follows them."""

    train: Segment  # the batches: [start, stop) of one epoch
    start_step: int  # steps done before its first batch
    end: Position  # where the run stands after its last batch (the next epoch's batch 0 after a whole epoch)
    evaluate: bool  # an evaluation follows it

    @property
    def num_batches(self) -> int:
        """Training batches (steps) in this stretch."""
        return max(0, self.train.stop - self.train.start)

    def position_after(self, batches: int) -> Position:
        """The position after this stretch's first ``batches`` batches (what a checkpoint within it records)."""
        return Position(self.start_step + batches, self.train.epoch, self.train.start + batches)

    @property
    def reported_epoch(self) -> int:
        """The epoch an evaluation after this stretch is reported under: epochs finished, plus one begun."""
        return self.end.epoch + (self.end.batch > 0)


@dataclass(frozen=True)
class Schedule:
    """A run of ``total_steps`` steps, ``steps_per_epoch`` to an epoch: an evaluation after every
    ``eval_every_epochs``-th finished epoch and after the last step; a checkpoint after every stretch and every
    ``checkpoint_every`` steps (0: only after stretches)."""

    steps_per_epoch: int
    total_steps: int
    eval_every_epochs: int = 1
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1 or self.eval_every_epochs < 1 or self.checkpoint_every < 0:
            raise ValueError(f"{self} needs steps_per_epoch >= 1, eval_every_epochs >= 1, checkpoint_every >= 0")

    @property
    def num_epochs(self) -> int:
        """Epochs the run touches (the last may stop part-way)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def stretches(self, start: Position) -> Iterator[Stretch]:
        """The training stretches a loop at ``start`` runs, in order, until ``total_steps``."""
        spe = self.steps_per_epoch
        step, epoch, batch = start.step, start.epoch, start.batch
        while epoch < self.num_epochs and step < self.total_steps:
            stop = min(spe, batch + self.total_steps - step)
            train = Segment("train", epoch, batch, stop)
            done = step + max(0, stop - batch)
            end = Position(done, epoch + 1, 0) if stop >= spe else Position(done, epoch, stop)
            evaluate = (end.batch == 0 and end.epoch % self.eval_every_epochs == 0) or done >= self.total_steps
            yield Stretch(train, step, end, evaluate)
            step, epoch, batch = end.step, end.epoch, end.batch

    def segments(self, start: Position) -> list[Segment]:
        """Every segment a loop at ``start`` reads, in order: each stretch's batches, then its evaluation if any."""
        return [seg for s in self.stretches(start) for seg in ([s.train, Segment("val")] if s.evaluate else [s.train])]

    def checkpoints_within(self, stretch: Stretch, step: int) -> bool:
        """Whether the loop saves a checkpoint right after ``step`` inside ``stretch``: every ``checkpoint_every``
        steps, except at the stretch's end, which is saved after its evaluation anyway."""
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0 and step < stretch.end.step
