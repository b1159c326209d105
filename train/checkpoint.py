"""Orbax checkpoints of the train state plus the loop position, keeping the last K and the best.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run killed
mid-write leaves no directory that ``latest_step`` would pick up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from train.steps import TrainState


class Checkpoints:
    """``workdir/checkpoints``: save/restore ``TrainState`` with a JSON ``meta`` (epoch, position, metrics)."""

    def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
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
        """Save at ``step``; ``metrics`` (with ``val_top1``) marks epoch-end checkpoints eligible as best."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=force,
        )

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """Restore ``step`` (default: latest) into the structure, dtypes and shardings of ``target``."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(_restore_target, target)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def best_step(self) -> int | None:
        """The kept epoch-end checkpoint with the highest validation top-1."""
        scored = [(m["val_top1"], s) for s in self.manager.all_steps()
                  if (m := self.read_meta(s).get("metrics")) and "val_top1" in m]
        return max(scored)[1] if scored else None

    def read_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        """Block until any asynchronous save has been committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _restore_target(x) -> jax.ShapeDtypeStruct:
    """Shape, dtype and sharding to restore into: the target's sharding, or this host's first device when the
    target is abstract, so a checkpoint from N devices restores on one (training on 8 GPUs, predicting here)."""
    sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

