"""Layers with PyTorch's numerics: convolutions with explicit padding and BatchNorm2d semantics."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_flax.conv import conv_general_dilated, stored

Dtype = Any
COMPUTE_DTYPES: dict[str, Dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # by command-line name

# torchvision: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"), an untruncated normal.
kaiming_normal_fan_out = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(
    in_planes: int,
    out_planes: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    dilation: int = 1,
    dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A bias-free conv with PyTorch's symmetric padding (never 'SAME', which pads strided convs unevenly).

    It computes through :func:`resnet_flax.conv.conv_general_dilated`, which picks the fast form per shape and
    backend; the parameters are ``nnx.Conv``'s.
    """
    return nnx.Conv(
        in_planes,
        out_planes,
        (kernel_size, kernel_size),
        strides=stride,
        padding=((padding, padding), (padding, padding)),
        kernel_dilation=dilation,
        feature_group_count=groups,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kaiming_normal_fan_out,
        conv_general_dilated=conv_general_dilated,
        rngs=rngs,
    )


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1, *,
            dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
    """3x3 convolution with padding = dilation, as torchvision's ``conv3x3``."""
    return conv(in_planes, out_planes, 3, stride=stride, padding=dilation, groups=groups,
                dilation=dilation, dtype=dtype, rngs=rngs)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1, *, dtype: Dtype = jnp.float32,
            rngs: nnx.Rngs) -> nnx.Conv:
    """1x1 convolution, as torchvision's ``conv1x1``."""
    return conv(in_planes, out_planes, 1, stride=stride, dtype=dtype, rngs=rngs)


def linear(in_features: int, out_features: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
    """A Linear layer initialised like ``torch.nn.Linear``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both tensors."""
    bound = 1.0 / math.sqrt(in_features)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Linear(
        in_features,
        out_features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
        bias_init=bias_init,
        rngs=rngs,
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
    """``torch.nn.MaxPool2d(window, stride, padding)`` on NHWC ``x``, padded with -inf.

    The maximum of the window's strided views of the input, and the derivative that of the first maximum of each
    window in scan order, as PyTorch's gradient is: elementwise work a compiler fuses, where XLA's reduce-window
    and select-and-scatter are slow on a CPU (resnet18's 64 px stem, batch 64, on a 2-core EPYC: the forward
    3.2 ms as a reduce-window, 2.0 ms as views; forward and backward 76-82 ms with select-and-scatter). The
    forward pass keeps each window's first maximum as an offset index; at 224 px, batch 16, the backward pass
    reading it takes 4.6 ms against 11.5 recomputing the comparisons (2-core AVX-512 EPYC).
    """
    return functools.reduce(jnp.maximum, _pool_views(x, window, stride, padding, -jnp.inf))


def _pool_views(x: jax.Array, window: int, stride: int, padding: int, fill: float) -> list[jax.Array]:
    """The window's offsets as strided views of ``x`` padded with ``fill``, in PyTorch's scan order."""
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=fill)
    n, hp, wp, c = xp.shape
    ho, wo = (hp - window) // stride + 1, (wp - window) // stride + 1
    return [jax.lax.slice(xp, (0, i, j, 0), (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                          (1, stride, stride, 1))
            for i in range(window) for j in range(window)]


@max_pool.defjvp
def _max_pool_jvp(window, stride, padding, primals, tangents):
    (x,), (t,) = primals, tangents
    views = _pool_views(x, window, stride, padding, -jnp.inf)
    y = functools.reduce(jnp.maximum, views)
    first = jnp.full(y.shape, len(views) - 1, jnp.int8)
    for k in reversed(range(len(views) - 1)):  # the first offset in scan order that holds the window's maximum
        first = jnp.where(views[k] == y, jnp.int8(k), first)
    # Stored on the CPU: else XLA fuses the comparisons into the backward pass, which then recomputes every
    # view (and the BatchNorm before it) for each of the offsets an input is read at.
    first = jax.lax.platform_dependent(first, y, cpu=stored, default=lambda first, y: first)
    out = jnp.zeros(y.shape, t.dtype)
    for k, t_view in enumerate(_pool_views(t, window, stride, padding, 0)):
        out = out + jnp.where(first == k, t_view, 0)
    return y, out


class BatchNorm(nnx.Module):
    """BatchNorm over the channel (last) axis with ``torch.nn.BatchNorm2d``'s semantics.

    Train mode normalises with the biased batch variance and updates
    ``mean``/``var`` with momentum 0.1 in PyTorch's convention, storing the *unbiased* variance
    in ``var`` exactly as PyTorch's ``running_var``. ``nnx.Module.eval()``/``train()`` switch modes.
    Statistics are computed in float32 whatever the compute dtype: in two passes for float32 inputs, as PyTorch,
    and in one for bf16/f16 inputs (see below). Under ``jit`` with a sharded
    batch the reductions are over the global batch (sync BatchNorm) with no extra code. A ``mask``
    keeps placeholder examples (unreadable images) out of the statistics and the unbiased count.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.1,
        epsilon: float = 1e-5,
        dtype: Dtype = jnp.float32,
        zero_scale: bool = False,
        use_running_average: bool = False,
    ):
        self.num_features = num_features
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.use_running_average = use_running_average
        self.scale = nnx.Param(jnp.zeros((num_features,)) if zero_scale else jnp.ones((num_features,)))
        self.bias = nnx.Param(jnp.zeros((num_features,)))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,)))
        self.var = nnx.BatchStat(jnp.ones((num_features,)))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view(model, use_running_average=...)``."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Normalise ``x``; in train mode, ``mask`` ([batch], 0 or 1) leaves examples with 0 out of the statistics."""
        xf = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            if mask is None:
                n = x.size // x.shape[-1]
            else:  # the examples with mask 0 are zeroed, whatever they hold, and left out of the count
                keep = jnp.reshape(mask > 0, (-1,) + (1,) * (x.ndim - 1))
                n = jnp.sum(mask > 0).astype(jnp.float32) * (x.size // x.shape[0] // x.shape[-1])
                xf = jnp.where(keep, xf, 0.0)
            mean = jnp.sum(xf, axis=axes) / jnp.maximum(n, 1.0)
            if jnp.dtype(x.dtype).itemsize < 4:
                # One pass, E[x^2] - E[x]^2 in float32: its cancellation error (about 2^-24 mean^2/var) stays far
                # under what rounding the inputs to 16 bits did to the variance (about 2^-18 mean^2/var), and it
                # reads the activations once instead of twice, which on a GPU is most of BatchNorm's cost.
                var = jnp.maximum(jnp.sum(jnp.square(xf), axis=axes) / jnp.maximum(n, 1.0) - jnp.square(mean), 0.0)
            else:  # two passes, as PyTorch, for float32 inputs
                centred = xf - mean if mask is None else jnp.where(keep, xf - mean, 0.0)
                var = jnp.sum(jnp.square(centred), axis=axes) / jnp.maximum(n, 1.0)
            unbiased = var * (n / max(n - 1, 1) if mask is None else n / jnp.maximum(n - 1.0, 1.0))
            m = self.momentum
            self.mean[...] = (1.0 - m) * self.mean[...] + m * mean
            self.var[...] = (1.0 - m) * self.var[...] + m * unbiased
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        mul = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
        y = x.astype(jnp.float32) * mul + (self.bias[...] - mean * mul)
        return y.astype(self.dtype)


class DropPath(nnx.Module):
    """timm's ``DropPath`` (stochastic depth) on a residual branch: in train mode each example's branch is zeroed
    with probability ``rate`` and the kept ones are scaled by ``1 / (1 - rate)``; the identity in eval mode.

    The per-example keep mask is ``bernoulli(rngs.dropout(), 1 - rate)``; ``rngs`` is required in train mode.
    """

    def __init__(self, rate: float, *, deterministic: bool = False):
        if not 0.0 < rate < 1.0:
            raise ValueError(f"drop path rate must be in (0, 1), got {rate}")
        self.rate = rate
        self.deterministic = deterministic

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view(model, deterministic=...)``."""
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """``x`` with each example kept (and scaled) or zeroed; unchanged in eval mode."""
        if self.deterministic:
            return x
        if rngs is None:
            raise ValueError("a model with drop_path_rate > 0 needs rngs=nnx.Rngs(...) in train mode")
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(rngs.dropout(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))
