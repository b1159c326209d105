"""Batch augmentations inside the jitted train step: random erasing's boxes, and mixup / cutmix with soft targets.

Mixup and cutmix are ``torchvision.transforms.v2.MixUp`` / ``CutMix`` as torchvision's reference scripts use them
(``RandomChoice([MixUp, CutMix])`` after collation): each example is mixed with the one before it in the global
batch (``roll(1)``), with lambda from Beta(alpha, alpha); cutmix pastes a box centred at a uniform pixel and mixes
the labels by the box's area. The draws come from a JAX key folded from the run's seed and the step, so a resumed
run mixes every batch as the uninterrupted run did. One difference from torchvision, where it has no case: an
example whose predecessor is masked out (an unreadable image) is left unmixed instead of mixed with a blank.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_MIX_TAG = 0x6D6978  # separates the mixing draws from any other use of the run's seed


class MixDraws(NamedTuple):
    """One batch's draws: cutmix (else mixup), lambda, and cutmix's box centre (column, row)."""

    cutmix: jax.Array
    lam: jax.Array
    center_x: jax.Array
    center_y: jax.Array


def erase_boxes(images: jax.Array, boxes: jax.Array) -> jax.Array:
    """Zero each image's (top, left, h, w) box (RandomErasing's value 0 after normalisation); h = w = 0: none."""
    rows = jnp.arange(images.shape[1])[None, :, None]
    cols = jnp.arange(images.shape[2])[None, None, :]
    top, left, h, w = (boxes[:, k, None, None] for k in range(4))
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return jnp.where(inside[..., None], jnp.zeros((), images.dtype), images)


def mix_key(seed: int, step: jax.Array) -> jax.Array:
    """The mixing key of one step of a run: the same on every host and after any resume."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed % 2**32), _MIX_TAG), step)


def draw_mix(key: jax.Array, mixup_alpha: float, cutmix_alpha: float, height: int, width: int) -> MixDraws:
    """Mixup or cutmix with equal chance when both alphas are positive (else the one that is), and its draws."""
    k_choice, k_lam, k_x, k_y = jax.random.split(key, 4)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        cutmix = jax.random.bernoulli(k_choice)
        alpha = jnp.where(cutmix, jnp.float32(cutmix_alpha), jnp.float32(mixup_alpha))
        lam = jax.random.beta(k_lam, alpha, alpha)
    else:
        alpha = cutmix_alpha if cutmix_alpha > 0 else mixup_alpha
        cutmix, lam = jnp.asarray(cutmix_alpha > 0), jax.random.beta(k_lam, alpha, alpha)
    return MixDraws(cutmix, lam.astype(jnp.float32), jax.random.randint(k_x, (), 0, width),
                    jax.random.randint(k_y, (), 0, height))


def _with_partners(mixed: jax.Array, x: jax.Array, mask: jax.Array) -> jax.Array:
    """``mixed`` rows, except ``x``'s own where the row's predecessor is masked out."""
    return jnp.where((jnp.roll(mask, 1) > 0).reshape((-1,) + (1,) * (x.ndim - 1)), mixed, x)


def mixup(images: jax.Array, targets: jax.Array, mask: jax.Array, lam: jax.Array | float
          ) -> tuple[jax.Array, jax.Array]:
    """``v2.MixUp`` with a given lambda: ``partner * (1 - lam) + x * lam`` for images and targets."""
    lam = jnp.asarray(lam, jnp.float32)
    mix = lambda x: _with_partners(jnp.roll(x, 1, axis=0) * (1.0 - lam) + x * lam, x, mask)  # noqa: E731
    return mix(images), mix(targets)


def cutmix_box(lam: jax.Array | float, center_x: jax.Array | int, center_y: jax.Array | int, height: int,
               width: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``v2.CutMix``'s box (x1, y1, x2, y2) for lambda and centre: half-sides ``int(0.5 * sqrt(1 - lam) * side)``."""
    r = 0.5 * jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
    half_w, half_h = jnp.floor(r * width).astype(jnp.int32), jnp.floor(r * height).astype(jnp.int32)
    return (jnp.maximum(center_x - half_w, 0), jnp.maximum(center_y - half_h, 0),
            jnp.minimum(center_x + half_w, width), jnp.minimum(center_y + half_h, height))


def cutmix(images: jax.Array, targets: jax.Array, mask: jax.Array, lam: jax.Array | float,
           center_x: jax.Array | int, center_y: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """``v2.CutMix`` with given draws: the partner's box pasted in, targets mixed by the box's area."""
    height, width = images.shape[1], images.shape[2]
    x1, y1, x2, y2 = cutmix_box(lam, center_x, center_y, height, width)
    rows = jnp.arange(height)[None, :, None, None]
    cols = jnp.arange(width)[None, None, :, None]
    inside = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
    mixed = jnp.where(inside, jnp.roll(images, 1, axis=0), images)
    area, total = (x2 - x1) * (y2 - y1), height * width
    # torchvision's weights, 1 - lam_adjusted and lam_adjusted, each rounded once to float32
    pasted, kept = area.astype(jnp.float32) / total, (total - area).astype(jnp.float32) / total
    return (_with_partners(mixed, images, mask),
            _with_partners(jnp.roll(targets, 1, axis=0) * pasted + targets * kept, targets, mask))


def mix_batch(key: jax.Array, images: jax.Array, targets: jax.Array, mask: jax.Array, mixup_alpha: float,
              cutmix_alpha: float) -> tuple[jax.Array, jax.Array]:
    """Mixup or cutmix of one normalised NHWC batch and its [batch, classes] targets, drawn from ``key``."""
    d = draw_mix(key, mixup_alpha, cutmix_alpha, images.shape[1], images.shape[2])
    if not cutmix_alpha > 0:
        return mixup(images, targets, mask, d.lam)
    if not mixup_alpha > 0:
        return cutmix(images, targets, mask, d.lam, d.center_x, d.center_y)
    return jax.lax.cond(d.cutmix, lambda: cutmix(images, targets, mask, d.lam, d.center_x, d.center_y),
                        lambda: mixup(images, targets, mask, d.lam))
