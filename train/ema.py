"""torchvision's ``ExponentialMovingAverage`` of the weights (``--model-ema``) as pure functions of the train state:
its state, the decay adjustment of torchvision's train.py, and the update after an optimizer step."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx


@flax.struct.dataclass
class EmaState:
    """torchvision's ``ExponentialMovingAverage`` of the weights: averaged parameters and BatchNorm statistics
    (``use_buffers=True``) and its ``n_averaged`` counter (0: the next update copies the model)."""

    params: nnx.State
    batch_stats: nnx.State
    n_averaged: jax.Array


def ema_decay_for(decay: float, global_batch: int, every: int, epochs: float) -> float:
    """torchvision's train.py adjustment of ``--model-ema-decay``: ``alpha = min(1, (1 - decay) * adjust)`` with
    ``adjust = world_size * batch_size * model_ema_steps / epochs`` (here the global batch); returns ``1 - alpha``."""
    return 1.0 - min(1.0, (1.0 - decay) * global_batch * every / epochs)


def ema_update(ema: EmaState, params: nnx.State, batch_stats: nnx.State, step: jax.Array, decay: Any, keep: Any,
               every: int, steps_per_epoch: Any, warmup_steps: Any) -> EmaState:
    """torchvision's EMA after the optimizer step of batch ``step`` (0-based, over the run): at batch index ``i``
    of its epoch with ``i % every == 0``, ``AveragedModel.update_parameters`` with ``ema_avg`` (a copy while
    ``n_averaged`` is 0, else ``decay * ema + keep * weight`` with ``keep = 1 - decay`` (computed in float64, as
    torch does), parameters and BatchNorm statistics alike),
    then ``n_averaged`` back to 0 while the step is in the warm-up (torchvision's ``epoch < lr_warmup_epochs``)."""
    def update(ema: EmaState) -> EmaState:
        def avg(a: jax.Array, p: jax.Array) -> jax.Array:
            mixed = jnp.asarray(decay, a.dtype) * a + jnp.asarray(keep, a.dtype) * p
            return jnp.where(ema.n_averaged == 0, p, mixed)

        n = jnp.where(step < warmup_steps, 0, ema.n_averaged + 1).astype(ema.n_averaged.dtype)
        return EmaState(jax.tree.map(avg, ema.params, params), jax.tree.map(avg, ema.batch_stats, batch_stats), n)

    return jax.lax.cond(step % steps_per_epoch % every == 0, update, lambda ema: ema, ema)
