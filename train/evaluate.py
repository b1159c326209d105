"""Evaluation over the whole validation split: loss, top-1 and top-5 (and the EMA's, with ``--model-ema``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from train.mesh import prefetch
from train.steps import TrainState


def evaluate(eval_step: Callable[[TrainState, dict[str, jax.Array]], dict[str, jax.Array]], state: TrainState,
             batches: Iterable[dict[str, np.ndarray]], sharding: NamedSharding) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) over the validation batches (``RunData.val()``; padding masked out)."""
    sums: dict[str, Any] = {}
    corrupt = 0
    for batch, n_bad in prefetch(batches, sharding):
        out = eval_step(state, batch)
        sums = out if not sums else jax.tree.map(jnp.add, sums, out)
        corrupt += n_bad
    if not sums:
        return {}
    sums = jax.tree.map(float, jax.device_get(sums))
    n = max(sums["count"], 1.0)
    result = {"val_loss": sums["loss_sum"] / n, "val_top1": 100 * sums["top1_sum"] / n,
              "val_top5": 100 * sums["top5_sum"] / n, "val_examples": int(sums["count"])}
    if "loss_sum_ema" in sums:  # the EMA's weights on the same batches
        result.update({"val_loss_ema": sums["loss_sum_ema"] / n, "val_top1_ema": 100 * sums["top1_sum_ema"] / n,
                       "val_top5_ema": 100 * sums["top5_sum_ema"] / n})
    if corrupt:
        result["val_skipped_images"] = corrupt
    return result


def format_eval(r: dict[str, float]) -> str:
    """One line for the log: loss, top-1, top-5 and how many images."""
    if not r:
        return "no validation examples"
    ema = (f"; EMA: loss {r['val_loss_ema']:.4f}  top-1 {r['val_top1_ema']:.2f}%  top-5 {r['val_top5_ema']:.2f}%"
           if "val_loss_ema" in r else "")
    return (f"val loss {r['val_loss']:.4f}  top-1 {r['val_top1']:.2f}%  top-5 {r['val_top5']:.2f}%{ema}  "
            f"({r['val_examples']} images)")
