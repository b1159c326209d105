"""An experimental lever: ResNet's 3x3/2 max-pool with a cheap backward pass (``--levers fast-maxpool``).

XLA:CPU lowers the gradient of ``reduce_window(max)`` (select-and-scatter) to a variadic reduce-window over
four full-size int32 iota tensors plus a scatter: about 7x PyTorch's max-pool backward here, some 6% of a
ResNet-18 training step. This version splits the input into its four 2x2 phases, so all nine window
candidates are plain arrays at the output resolution; the forward takes their max and remembers which one
won (the first in row-major window order, as XLA and PyTorch pick), and the backward routes the cotangent
to that candidate with a few fused elementwise passes. Values and gradients equal ``nnx.max_pool``'s.

It lives here, not in resnet_flax, because model.py is not this change's to edit; adopting it there is a
one-line change in ``ResNet.stages``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_flax.model import ResNet

# Window position (kh, kw) -> (row phase, col phase, shift rows down, shift cols right) of the 2x2 phases.
_TAPS = [(kh, kw) for kh in range(3) for kw in range(3)]


def _phase(kh: int) -> tuple[int, bool]:
    """Row (or column) phase and whether it is shifted by one, for window offset kh in {0, 1, 2}."""
    return (1, True) if kh == 0 else (0, False) if kh == 1 else (1, False)


def _shift(a: jax.Array, axis: int, fill: float) -> jax.Array:
    """``a[i - 1]`` along ``axis`` with ``fill`` at i = 0."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (1, 0)
    return jax.lax.slice_in_dim(jnp.pad(a, pad, constant_values=fill), 0, a.shape[axis], axis=axis)


def _unshift(a: jax.Array, axis: int) -> jax.Array:
    """The transpose of :func:`_shift`: ``a[i + 1]`` with 0 at the end."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, 1)
    return jax.lax.slice_in_dim(jnp.pad(a, pad), 1, a.shape[axis] + 1, axis=axis)


def _candidates(x: jax.Array) -> list[jax.Array]:
    """The nine window taps of a 3x3/2 pool with padding 1, each (B, H/2, W/2, C), in row-major order."""
    b, h, w, c = x.shape
    phases = x.reshape(b, h // 2, 2, w // 2, 2, c)
    out = []
    for kh, kw in _TAPS:
        (ph, sh), (pw, sw) = _phase(kh), _phase(kw)
        tap = phases[:, :, ph, :, pw]
        if sh:
            tap = _shift(tap, 1, -jnp.inf)
        if sw:
            tap = _shift(tap, 2, -jnp.inf)
        out.append(tap)
    return out


def _forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The pooled values and the index (0..8) of the first tap that attains the max."""
    taps = _candidates(x)
    pooled = taps[0]
    for tap in taps[1:]:
        pooled = jnp.maximum(pooled, tap)
    winner = jnp.full(pooled.shape, len(taps) - 1, jnp.int8)
    for k in range(len(taps) - 2, -1, -1):
        winner = jnp.where(taps[k] == pooled, jnp.int8(k), winner)
    return pooled, winner


@jax.custom_vjp
def max_pool_3x3s2(x: jax.Array) -> jax.Array:
    """``nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))`` for NHWC x with even H and W."""
    return _forward(x)[0]


def _fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    # The barrier makes XLA store the int8 winner map instead of fusing (recomputing) it into each of the
    # nine consumers in the backward pass, which made the whole thing 3x slower.
    pooled, winner = jax.lax.optimization_barrier(_forward(x))
    return pooled, winner


def _bwd(winner: jax.Array, ct: jax.Array) -> tuple[jax.Array]:
    b, h2, w2, c = ct.shape
    grads = {}  # (row phase, col phase) -> gradient at output resolution
    for k, (kh, kw) in enumerate(_TAPS):
        (ph, sh), (pw, sw) = _phase(kh), _phase(kw)
        g = jnp.where(winner == k, ct, jnp.zeros((), ct.dtype))
        if sw:
            g = _unshift(g, 2)
        if sh:
            g = _unshift(g, 1)
        grads[(ph, pw)] = grads[(ph, pw)] + g if (ph, pw) in grads else g
    rows = [jnp.stack([grads[(ph, 0)], grads[(ph, 1)]], axis=3) for ph in (0, 1)]  # (b, h2, w2, 2, c)
    return (jnp.stack(rows, axis=2).reshape(b, 2 * h2, 2 * w2, c),)


max_pool_3x3s2.defvjp(_fwd, _bwd)


def stem_pool(x: jax.Array) -> jax.Array:
    """The fast pool where it applies (even H, W), else ``nnx.max_pool``."""
    if x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
        return max_pool_3x3s2(x)
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class FastPoolResNet(ResNet):
    """``ResNet`` with :func:`stem_pool` in place of ``nnx.max_pool``; same variables, same outputs."""

    def stem(self, x: jax.Array) -> jax.Array:
        """As ``ResNet.stem``, with the fast max-pool."""
        return stem_pool(jax.nn.relu(self.bn1(self.conv1(x.astype(self.dtype)))))
