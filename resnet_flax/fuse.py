"""Inference-only ResNet with every BatchNorm folded into the convolution before it.

In eval mode BatchNorm is a per-channel affine map, so ``bn(conv(x, W)) == conv(x, W * m) + (b - mean * m)`` with
``m = scale / sqrt(var + eps)``. Folding removes one multiply-add pass over every activation (the bias add fuses
into the convolution's epilogue) and all BatchNorm state from the compiled function. Typical use::

    apply_fn, params = fold_batchnorm(model)
    logits = jax.jit(apply_fn)(params, images_nhwc)

The folded logits equal ``model.eval()(images)`` up to float32 rounding (about 1e-6 relative).

:func:`inference_fn` is the one-call fast path (folding plus the backend's compile options); ``train.predict``
and ``python -m train --eval-only`` use it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet_flax.conv import CPU_EVAL_OPTIONS, conv2d, cpu_compiler_options
from resnet_flax.layers import BatchNorm, Dtype, max_pool
from resnet_flax.model import BasicBlock, Bottleneck, ResNet

FoldedParams = dict[str, Any]
ApplyFn = Callable[[FoldedParams, jax.Array], jax.Array]

@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """The static shape of one folded convolution: what the forward pass needs besides its weights."""

    stride: int
    padding: int
    dilation: int
    groups: int


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """One residual block: its convolutions in order (2 basic, 3 bottleneck) and the optional downsample."""

    convs: tuple[ConvSpec, ...]
    downsample: ConvSpec | None


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static structure of a folded ResNet: stem conv, the blocks of the four stages, compute dtype."""

    stem: ConvSpec
    blocks: tuple[BlockPlan, ...]
    dtype: Any


def fold_conv_bn(conv: nnx.Conv, bn: BatchNorm) -> tuple[dict[str, jax.Array], ConvSpec]:
    """``conv`` followed by eval-mode ``bn`` as one biased convolution; folded in float64, stored float32."""
    kernel = np.asarray(conv.kernel[...], np.float64)  # HWIO: the output channel is the last axis
    mul = np.asarray(bn.scale[...], np.float64) / np.sqrt(np.asarray(bn.var[...], np.float64) + bn.epsilon)
    bias = np.asarray(bn.bias[...], np.float64) - np.asarray(bn.mean[...], np.float64) * mul
    (pad_lo, pad_hi), _ = conv.padding
    if pad_lo != pad_hi:
        raise ValueError(f"expected symmetric padding, got {conv.padding}")
    spec = ConvSpec(stride=_single(conv.strides), padding=int(pad_lo), dilation=_single(conv.kernel_dilation),
                    groups=int(conv.feature_group_count))
    params = {"kernel": jnp.asarray(kernel * mul, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
    return params, spec


def _single(value: Any) -> int:
    """A square stride/dilation (int or equal pair) as one int."""
    values = {int(value)} if isinstance(value, int) else {int(v) for v in value}
    if len(values) != 1:
        raise ValueError(f"expected a square window setting, got {value}")
    return values.pop()


def _block_pairs(block: BasicBlock | Bottleneck) -> list[tuple[nnx.Conv, BatchNorm]]:
    """The (conv, bn) pairs of a block's main path, in forward order."""
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if isinstance(block, Bottleneck):
        pairs.append((block.conv3, block.bn3))
    return pairs


def _fold_block(block: BasicBlock | Bottleneck) -> tuple[dict[str, Any], BlockPlan]:
    """Folded weights and static plan of one residual block."""
    folded = [fold_conv_bn(conv, bn) for conv, bn in _block_pairs(block)]
    params: dict[str, Any] = {"convs": [p for p, _ in folded]}
    downsample = None
    if block.downsample is not None:
        params["downsample"], downsample = fold_conv_bn(block.downsample[0], block.downsample[1])
    return params, BlockPlan(convs=tuple(s for _, s in folded), downsample=downsample)


def fold_batchnorm(model: ResNet) -> tuple[ApplyFn, FoldedParams]:
    """``(apply_fn, params)`` computing ``model``'s eval-mode logits with BatchNorm folded into the convs.

    ``apply_fn(params, x)`` takes NHWC images like ``model(x)`` and returns float32 logits; jit it yourself.
    The model is read, never modified; its running statistics are what get folded in.
    """
    timm_options = model.config.timm_options
    if timm_options:
        raise ValueError(f"fold_batchnorm does not fold timm's {', '.join(timm_options)}; run the model itself")
    stem_params, stem_spec = fold_conv_bn(model.conv1, model.bn1)
    blocks = [blk for name in ("layer1", "layer2", "layer3", "layer4") for blk in getattr(model, name)]
    folded = [_fold_block(blk) for blk in blocks]
    params = {
        "stem": stem_params,
        "blocks": [p for p, _ in folded],
        "fc": {"kernel": jnp.asarray(model.fc.kernel[...]), "bias": jnp.asarray(model.fc.bias[...])},
    }
    plan = Plan(stem=stem_spec, blocks=tuple(b for _, b in folded), dtype=model.dtype)
    return functools.partial(folded_forward, plan), params


def conv_bias(x: jax.Array, params: dict[str, jax.Array], spec: ConvSpec, dtype: Dtype) -> jax.Array:
    """A folded convolution: NHWC ``x`` with the HWIO kernel, PyTorch's symmetric padding, plus the bias."""
    y = conv2d(x, params["kernel"].astype(dtype), spec.stride, spec.padding, spec.dilation, spec.groups)
    return y + params["bias"].astype(dtype)


def block_forward(x: jax.Array, params: dict[str, Any], plan: BlockPlan, dtype: Dtype) -> jax.Array:
    """One residual block: ReLU after every conv but the last, then the residual add and ReLU."""
    out = x
    last = len(plan.convs) - 1
    for i, (p, spec) in enumerate(zip(params["convs"], plan.convs)):
        out = conv_bias(out, p, spec, dtype)
        if i < last:
            out = jax.nn.relu(out)
    identity = x if plan.downsample is None else conv_bias(x, params["downsample"], plan.downsample, dtype)
    return jax.nn.relu(out + identity)


def folded_forward(plan: Plan, params: FoldedParams, x: jax.Array) -> jax.Array:
    """Float32 logits of the folded network (the body of ``apply_fn``)."""
    dtype = plan.dtype
    x = jax.nn.relu(conv_bias(x.astype(dtype), params["stem"], plan.stem, dtype))
    x = max_pool(x, 3, 2, 1)
    for block_params, block_plan in zip(params["blocks"], plan.blocks):
        x = block_forward(x, block_params, block_plan, dtype)
    feats = jnp.mean(x, axis=(1, 2))
    fc = params["fc"]
    return (jnp.dot(feats, fc["kernel"].astype(dtype)) + fc["bias"].astype(dtype)).astype(jnp.float32)


def inference_fn(model: ResNet) -> Callable[[jax.Array], jax.Array]:
    """The fastest eval-mode forward found by ``benchmarks`` for this backend: ``logits = inference_fn(model)(x)``.

    BatchNorm folded into the convolutions (:func:`fold_batchnorm`, read from the model now: retrain, call
    again) and jit-compiled with the backend's inference options (``CPU_EVAL_OPTIONS`` on CPU). Takes NHWC
    images like ``model(x)``, returns float32 logits equal to ``model.eval()(x)`` to float32 rounding.
    """
    options = cpu_compiler_options(CPU_EVAL_OPTIONS)
    if model.config.timm_options or model.fc is None:  # not foldable: the eval-mode model itself
        snapshot = nnx.clone(model)
        snapshot.eval()
        graphdef, state = nnx.split(snapshot)
        jitted = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x), compiler_options=options)
        return functools.partial(jitted, state)
    apply_fn, params = fold_batchnorm(model)
    return functools.partial(jax.jit(apply_fn, compiler_options=options), params)
