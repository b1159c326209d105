"""LAMB and LARS as optax chains, each equal to the optimizer a published large-batch recipe used.

- :func:`lamb` is timm's ``timm.optim.Lamb`` with its defaults, as timm's "ResNet strikes back" recipes build it
  (``create_optimizer_v2(opt="lamb")``): the gradients clipped to global norm 1 over all parameters, Adam moments
  (0.9, 0.999, eps 1e-6, bias-corrected), L2 weight decay added to the update, then the layer-wise trust ratio
  ``|w| / |update|`` (1 where either norm is 0) on the parameters that get weight decay only (timm adapts a
  parameter group only when its weight decay is not 0; BatchNorm parameters and biases form the group without).
- :func:`lars` is MLPerf's LARS (the TensorFlow ``LARSOptimizer`` of MLPerf's ResNet-50 reference, You et al.
  2017): on conv/linear kernels ``g <- eta |w| / (|g| + wd |w|) * (g + wd w)`` with eta 0.001 and epsilon 0;
  BatchNorm parameters and biases get neither the adaptation nor weight decay (MLPerf's skip list); then
  momentum with the learning rate inside the buffer (``v <- m v + lr g; w <- w - v``), as MLPerf and optax do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

LARS_TRUST_COEFFICIENT = 0.001  # MLPerf's eeta
Mask = Callable[[Any], Any]


def lamb(learning_rate: optax.ScalarOrSchedule, weight_decay: float, mask: Mask, b1: float = 0.9,
         b2: float = 0.999, eps: float = 1e-6, max_grad_norm: float = 1.0) -> optax.GradientTransformation:
    """timm's ``Lamb`` (defaults as timm's): clip, Adam, decay and trust ratio on the ``mask`` parameters."""
    # the same chain (and state layout) whatever the decay; without decay timm adapts no parameter
    adapt = mask if weight_decay else (lambda params: jax.tree.map(lambda _: False, params))
    return optax.chain(optax.clip_by_global_norm(max_grad_norm),
                       optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                       optax.add_decayed_weights(weight_decay, mask=mask),
                       optax.masked(optax.scale_by_trust_ratio(), adapt),
                       optax.scale_by_learning_rate(learning_rate))


def scale_by_lars(weight_decay: float, trust_coefficient: float = LARS_TRUST_COEFFICIENT,
                  eps: float = 0.0) -> optax.GradientTransformation:
    """MLPerf's LARS adaptation with its weight decay: ``eta |w| / (|g| + wd |w| + eps) * (g + wd w)``."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)

        def adapt(g: jax.Array, w: jax.Array) -> jax.Array:
            w_norm, g_norm = jnp.linalg.norm(w.ravel()), jnp.linalg.norm(g.ravel())
            ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
            ratio = jnp.where((w_norm > 0) & (g_norm > 0), ratio, jnp.ones_like(ratio))
            return (g + weight_decay * w) * ratio

        return jax.tree.map(adapt, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def lars(learning_rate: optax.ScalarOrSchedule, weight_decay: float, mask: Mask, momentum: float = 0.9,
         nesterov: bool = False, trust_coefficient: float = LARS_TRUST_COEFFICIENT
         ) -> optax.GradientTransformation:
    """MLPerf's LARS: the adaptation and decay on the ``mask`` parameters, then momentum of ``lr * update``."""
    return optax.chain(optax.masked(scale_by_lars(weight_decay, trust_coefficient), mask),
                       optax.scale_by_learning_rate(learning_rate),
                       optax.trace(decay=momentum, nesterov=nesterov))
