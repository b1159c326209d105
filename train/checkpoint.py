"""Orbax checkpoints of the train state plus the loop position, keeping the last K and the best.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run killed
mid-write leaves no directory that ``latest_step`` would pick up, and it deletes old checkpoints only after
a new one is committed, so a failed write (full or read-only disk) keeps the earlier ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from resnet_flax.errors import first_line
from train.errors import CheckpointError, CheckpointWriteError
from train.steps import TrainState
from train.storage import AnyPath, as_path, is_url

TMP_SUFFIX = ".orbax-checkpoint-tmp"


class _QuietOrbaxErrors(logging.Filter):
    """Drop orbax's logged tracebacks of a failed save (:class:`Checkpoints` reports the failure in one line) and
    its "Waiting for previous save to complete took N seconds" warnings (a save waits for the one before it by
    design; on a busy machine with a short --checkpoint-every every save would print one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        return record.levelno < logging.ERROR and not record.getMessage().startswith("Waiting for previous save")


logging.getLogger("absl").addFilter(_QuietOrbaxErrors())


def _quiet_late_write_callbacks(hook=sys.unraisablehook):
    """Drop 'Event loop is closed' from tensorstore's write callbacks that arrive after a failed save has closed
    Orbax's event loop (about 160 bare tracebacks on a full disk); every other unraisable error still prints."""
    def unraisable(u) -> None:
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            hook(u)

    sys.unraisablehook = unraisable


_quiet_late_write_callbacks()


class Checkpoints:
    """``workdir/checkpoints``: save/restore ``TrainState`` with a JSON ``meta`` (epoch, position, metrics)."""

    def __init__(self, workdir: str | AnyPath, keep: int = 3, async_save: bool = True):
        workdir = as_path(workdir)
        self.directory = (workdir if is_url(workdir) else workdir.absolute()) / "checkpoints"
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: m["val_top1"], n=1, keep_checkpoints_without_metrics=False),
        ])
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                                 enable_async_checkpointing=async_save),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, meta: dict[str, Any], metrics: dict[str, float] | None = None,
             force: bool = False) -> bool:
        """Save at ``step``; ``metrics`` (with ``val_top1``) marks epoch-end checkpoints eligible as best.

        The caller checks that ``state`` is finite (``train_step``'s ``state_finite``); a previous asynchronous
        save that failed raises :class:`CheckpointWriteError` here.
        """
        with self._write_errors():
            return self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                metrics=metrics,
                force=force,
            )

    def restore(self, target: TrainState, step: int | None = None, meta: bool = True
                ) -> tuple[TrainState, dict[str, Any]]:
        """Restore ``step`` (default: latest) into the structure, dtypes and shardings of ``target``, with its
        metadata (``{}`` when ``meta`` is False: a caller that read it with :meth:`read_meta` already).

        A checkpoint that cannot be read (tampered, truncated, another model) or holds non-finite weights
        raises :class:`CheckpointError` in one line.
        """
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(_restore_target, target)
        where = self.directory / str(step)
        try:
            parts = {"state": ocp.args.StandardRestore(abstract), **({"meta": ocp.args.JsonRestore()} if meta else {})}
            restored = self.manager.restore(step, args=ocp.args.Composite(**parts))
        except Exception as e:  # orbax/tensorstore raise ValueError, KeyError, OSError, ... on damaged files
            raise CheckpointError(f"checkpoint {where} cannot be read ({first_line(e)}); delete it to resume from "
                               "an earlier one, or start afresh in a new --workdir") from None
        if not _finite_here(restored.state.params, restored.state.batch_stats):
            raise CheckpointError(f"checkpoint {where} holds non-finite (NaN/inf) weights; delete it to use an "
                               "earlier one, or start afresh in a new --workdir")
        return restored.state, restored.meta if meta else {}

    def best_step(self) -> int | None:
        """The kept epoch-end checkpoint with the highest validation top-1."""
        scored = [(m["val_top1"], s) for s in self.manager.all_steps()
                  if (m := self.read_meta(s).get("metrics")) and "val_top1" in m]
        return max(scored)[1] if scored else None

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be read ({first_line(e)}); "
                               "delete it to use an earlier one, or start afresh in a new --workdir") from None

    def discard_from(self, step: int) -> list[int]:
        """Delete the checkpoints of ``step`` and later (weights found to be bad); returns their steps."""
        self.wait()
        gone = [s for s in self.manager.all_steps() if s >= step]
        for s in gone:
            self.manager.delete(s)
        return gone

    def wait(self) -> None:
        """Block until any asynchronous save has been committed (:class:`CheckpointWriteError` if it failed)."""
        with self._write_errors():
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._write_errors():
            self.manager.close()

    @contextlib.contextmanager
    def _write_errors(self):
        """Turn a failed checkpoint write into one :class:`CheckpointWriteError`, removing its partial files."""
        try:
            yield
        except CheckpointWriteError:
            raise
        except Exception as e:
            self.remove_partial()
            complete = sorted(int(p.name) for p in self.directory.glob("*") if p.name.isdigit())
            kept = f"the last complete checkpoint (step {complete[-1]}) is kept" if complete else "none was complete"
            raise CheckpointWriteError(f"cannot write a checkpoint in {self.directory} ({_reason(e)}); {kept}; "
                                       "free space or fix the folder's permissions, then rerun to resume") from None

    def remove_partial(self) -> None:
        """Delete the temporary directories of checkpoints whose write failed (they may fill the disk)."""
        for p in self.directory.glob(f"*{TMP_SUFFIX}*"):
            if is_url(p):
                with contextlib.suppress(OSError):
                    p.rmtree()
            else:
                shutil.rmtree(p, ignore_errors=True)


def _reason(e: BaseException) -> str:
    """The OS error behind a failed write (tensorstore reports it as ``[os_error_code='28']``)."""
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    code = re.search(r"os_error_code='?(\d+)", str(e))
    return os.strerror(int(code.group(1))) if code else first_line(e)


def _finite_here(*trees: Any) -> bool:
    """Whether every value is finite, read from this process's first copy of each (replicated) array: a jitted
    reduction over a multi-host mesh's arrays would need every host, and each host holds all the values."""
    return all(bool(np.isfinite(np.asarray(x.addressable_data(0))).all()) for x in jax.tree.leaves(trees))


def _restore_target(x) -> jax.ShapeDtypeStruct:
    """Shape, dtype and sharding to restore into: the target's sharding, or this host's first device when the
    target is abstract, so a checkpoint from N devices restores on one (training on 8 GPUs, predicting here)."""
    sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

