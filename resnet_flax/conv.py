"""How a convolution runs on each backend: XLA's convolution, or patches then one matmul where XLA:CPU is slow.

XLA:CPU's convolution is very slow on small feature maps (a 3x3 conv, 512 -> 512 channels on a 2x2 map runs at about
2 GFLOP/s; openxla/xla#34273, jax-ml/jax#31662). The same arithmetic as "im2col" (pad, the kh*kw shifted windows
concatenated on the channel axis, one matmul; grouped convs as a group-batched matmul) runs at matmul speed there,
and leaves out the taps that only ever see padding. XLA:CPU's grouped-convolution gradients are slow at every map
size, so grouped convs keep XLA's forward and take the matmul form's gradients. :func:`cpu_form` decides per layer
from static shapes which form the CPU compiles; other backends always get XLA's convolution
(``jax.lax.platform_dependent``, so a program lowered for a GPU or TPU carries no trace of the others). All forms
agree to float32 rounding, forward and backward. On the CPU, XLA's form takes its kernel gradient from the stored
input and a strided convolution's input gradient one input phase at a time, and the matmul form its input gradient
from a materialised kernel transpose, each avoiding a slow path of XLA:CPU (see their docstrings).

This module is also the one home of the XLA:CPU compile options the project uses (``CPU_TRAIN_OPTIONS``,
``CPU_EVAL_OPTIONS``, :func:`cpu_compiler_options`), since they too select how convolutions run.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

Form = Literal["xla", "matmul", "matmul_grads"]
Policy = Literal["auto", "xla", "matmul", "matmul_grads"]

# The XLA:CPU option sets measured (`python -m benchmarks --levers`; docs/performance.md, "Compile options").
# jaxlib 0.10's XLA:CPU sends convolutions and reductions to YNNPACK by default; YNN_REDUCE_ONLY keeps YNNPACK for
# the reductions (BatchNorm statistics) and gives convolutions to XLA's Eigen path; YNN_OFF uses no YNNPACK.
# Process-wide equivalents: XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=reduce or =.
YNN_REDUCE_ONLY: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
YNN_OFF: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}

# What every CPU gets: the same choice won on both kinds of host measured. Training: YNNPACK for reductions only,
# 1.92x plain on the AVX2 host (first-generation EPYC; resnet18 224 px b8) and 1.12-1.23x on the AVX-512 one
# (EPYC family 25 model 17; resnet18 b64 at 32 and 64 px), where no YNNPACK was 0.94-1.14x. Inference: no
# YNNPACK, 1.34x plain on the AVX2 host; on the AVX-512 host it and reductions-only were within the noise of a
# shared 2-core machine of each other (1.0-1.5x plain, run to run). Other backends get no options.
CPU_TRAIN_OPTIONS: dict[str, Any] = YNN_REDUCE_ONLY
CPU_EVAL_OPTIONS: dict[str, Any] = YNN_OFF

_policy: contextvars.ContextVar[Policy] = contextvars.ContextVar("resnet_flax_conv_policy", default="auto")


@contextlib.contextmanager
def conv_policy(policy: Policy) -> Iterator[None]:
    """Within the block, functions *traced* compute convolutions as ``policy`` says (for benchmarks and tests).

    It is read when a function is traced: a ``jax.jit`` function already traced with other settings keeps
    its compiled form (jit's cache does not see the policy), so apply it to freshly defined functions.

    "auto" (the default) follows :func:`cpu_form` on CPU and XLA's convolution elsewhere; a form's name
    uses that form on every backend ("xla" is ``lax.conv_general_dilated`` as is).
    """
    if policy != "auto" and policy not in FORMS:
        raise ValueError(f"conv policy must be 'auto' or one of {sorted(FORMS)}, got {policy!r}")
    token = _policy.set(policy)
    try:
        yield
    finally:
        _policy.reset(token)


@functools.cache
def _cpu_options_supported(items: tuple[tuple[str, Any], ...]) -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(items)).lower(jnp.zeros(())).compile()
        return True
    except Exception:  # an XLA that does not know the option: compile without it
        return False


def cpu_compiler_options(options: dict[str, Any]) -> dict[str, Any] | None:
    """``options`` when the default backend is CPU and its XLA accepts them, else None (for ``jax.jit``)."""
    if jax.default_backend() != "cpu" or not _cpu_options_supported(tuple(sorted(options.items()))):
        return None
    return options


def _out_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    """The output length along one axis, as PyTorch's and XLA's convolutions compute it."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def cpu_form(in_size: int, in_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
             dilation: int = 1, groups: int = 1) -> Form:
    """The fastest form of this square NHWC convolution on XLA:CPU (per-shape timings: `python -m benchmarks.convs`).

    - "matmul_grads" for grouped spatial convolutions (ResNeXt): XLA's forward is the fastest form at every
      map size, but its gradients are 20-40x slower than the group-batched matmul's, so the forward stays
      XLA's and the backward pass is the matmul form's.
    - "matmul" when a spatial kernel's output map is 2x2 or smaller: XLA:CPU's convolution is 10-40x slower
      there (forward or backward). From 4x4 up XLA is as fast or faster; 1x1 convs are matmuls for it already.
    - "xla" otherwise, the 7x7/2 stem included (as patches-matmul it is 2-4x slower, and as a 4x4/1 conv on the
      2x2 space-to-depth input no faster once its kernel gradient is counted).
    """
    out = _out_size(in_size, kernel_size, stride, padding, dilation)
    if kernel_size > 1 and groups > 1:
        return "matmul_grads"
    if kernel_size > 1 and out * out <= 4:
        return "matmul"
    return "xla"


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0, dilation: int = 1,
           groups: int = 1, precision: Any = None) -> jax.Array:
    """NHWC ``x`` convolved with the HWIO ``kernel``, PyTorch's symmetric ``padding``, in the fastest form."""
    args = (stride, padding, dilation, groups, precision)
    policy = _policy.get()
    if policy != "auto":
        return FORMS[policy](x, kernel, *args)
    _, h, w, cin = x.shape
    kh, kw, _, _ = kernel.shape
    form = cpu_form(h, cin, kh, *args[:4]) if h == w and kh == kw else "xla"
    cpu = _xla_conv_stored_input if form == "xla" else FORMS[form]
    return lax.platform_dependent(
        x, kernel, cpu=lambda a, b: cpu(a, b, *args), default=lambda a, b: _xla_conv(a, b, *args))


def _xla_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int, dilation: int, groups: int,
              precision: Any) -> jax.Array:
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), ((padding, padding), (padding, padding)), rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups, precision=precision)


def live_taps(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> list[int]:
    """The kernel rows (or columns) that meet the input somewhere along one axis; the others only see padding.

    On a 1x1 map a 3x3 kernel with padding 1 meets the input with its centre only, and a 3x3/2 kernel on a 2x2
    map with its lower-right 2x2: the other taps multiply zeros, so the matmul form leaves them out.
    """
    out = _out_size(size, kernel_size, stride, padding, dilation)
    return [i for i in range(kernel_size)
            if any(padding <= i * dilation + r * stride < padding + size for r in range(out))]


def _matmul_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int, dilation: int, groups: int,
                 precision: Any) -> jax.Array:
    """The convolution as the strided windows of the padded input, concatenated, times the kernel.

    Only the taps that meet the input (:func:`live_taps`) take part: the rest would add products with zeros,
    so their kernel gradient is exactly zero either way, and on the 1x1 maps of a ResNet's last stage at 32 px
    the matmuls shrink ninefold.
    """
    n, h, w, cin = x.shape
    kh, kw, cin_g, cout = kernel.shape
    out_h, out_w = _out_size(h, kh, stride, padding, dilation), _out_size(w, kw, stride, padding, dilation)
    rows, cols = live_taps(h, kh, stride, padding, dilation), live_taps(w, kw, stride, padding, dilation)
    if not rows or not cols:  # every window lies in the padding
        return jnp.zeros((n, out_h, out_w, cout), x.dtype)
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    windows = [
        lax.slice(x, (0, i * dilation, j * dilation, 0),
                  (n, i * dilation + (out_h - 1) * stride + 1, j * dilation + (out_w - 1) * stride + 1, cin),
                  (1, stride, stride, 1))
        for i in rows for j in cols]
    kernel = kernel.astype(x.dtype)
    if len(rows) < kh or len(cols) < kw:
        kernel = jnp.stack([kernel[i, j] for i in rows for j in cols])
    taps = len(windows)
    if groups == 1:
        patches = windows[0] if taps == 1 else jnp.concatenate(windows, axis=-1)
        return _patches_dot(patches, kernel.reshape(taps * cin_g, cout), precision)
    patches = jnp.stack(windows, axis=3).reshape(n, out_h, out_w, taps, groups, cin_g)
    k = kernel.reshape(taps, cin_g, groups, cout // groups)
    y = jnp.einsum("nhwtgc,tcgo->nhwgo", patches, k, precision=precision)
    return y.reshape(n, out_h, out_w, cout)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _patches_dot(patches: jax.Array, kernel: jax.Array, precision: Any) -> jax.Array:
    """``patches @ kernel`` whose input gradient multiplies by a materialised transpose of the kernel.

    XLA:CPU's Eigen matmul with a transposed right operand (``dy @ kernel.T``, the input gradient) runs at a
    third of its usual speed (a [256, 512] x [512, 4608] product: 8.5 ms vs 3.8 with the transpose copied out
    first, on a 2-core AVX-512 EPYC); the optimization barrier keeps XLA from folding the copy back into the dot.
    A JVP rule (not a VJP one), so forward-mode differentiation still works.
    """
    return jnp.dot(patches, kernel, precision=precision)


@_patches_dot.defjvp
def _pd_jvp(precision, primals, tangents):
    patches, kernel = primals
    d_patches, d_kernel = tangents
    kernel_t = lax.optimization_barrier(kernel.T)  # reverse mode: the input gradient is ct @ kernel_t
    out = jnp.dot(patches, kernel, precision=precision)
    return out, jnp.dot(d_patches, kernel_t.T, precision=precision) + jnp.dot(patches, d_kernel, precision=precision)


def stored(x: jax.Array, key: jax.Array) -> jax.Array:
    """``x`` through an identity ``lax.cond`` that XLA cannot fold: a buffer that no fusion sees through.

    XLA fuses an elementwise producer into each consumer, recomputing it there; behind this its consumers read
    it once computed. The predicate, that the sum of ``key``'s first elements along its leading axis equals
    itself (a slice a batch-sharded ``key`` allows), is false only when they sum to NaN (a NaN among them, or
    infinities of both signs), where the gradients are NaN anyway; ``x`` is then NaN (integers: their largest
    value). ``lax.optimization_barrier`` would not do:
    XLA:CPU removes it before fusion.
    """
    probe = jnp.sum(key[(slice(None),) + (0,) * (key.ndim - 1)])
    fill = jnp.nan if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.iinfo(x.dtype).max
    return lax.cond(probe == probe, lambda v: v, lambda v: jnp.full_like(v, fill), x)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5, 6))
def _xla_conv_stored_input(x: jax.Array, kernel: jax.Array, stride: int, padding: int, dilation: int, groups: int,
                           precision: Any) -> jax.Array:
    """XLA's convolution, its gradients shaped around XLA:CPU's slow paths and equal to autodiff's to float32.

    - Kernel gradient from the stored input (bitwise autodiff's). XLA:CPU computes it as a convolution over the
      batch, which needs the input transposed (channels first, batch last). It fuses the input's producer
      (BatchNorm, residual add and ReLU of one or two blocks) into that transpose, recomputing it in transposed
      order: 5-7x slower than transposing the stored input (a [64, 16, 16, 64] map: 1.5 ms vs 0.2 ms on a 2-core
      AVX-512 EPYC). The JVP rule's kernel term reads the input through :func:`stored`, so reverse mode's kernel
      gradient does too.
    - A strided convolution's input gradient from :func:`_strided_input_tangent`: one stride-1 convolution per
      input phase instead of XLA's convolution over a gradient dilated with zeros.
    """
    return _xla_conv(x, kernel, stride, padding, dilation, groups, precision)


@_xla_conv_stored_input.defjvp
def _xsi_jvp(stride, padding, dilation, groups, precision, primals, tangents):
    x, kernel = primals
    d_x, d_kernel = tangents
    conv = functools.partial(_xla_conv, stride=stride, padding=padding, dilation=dilation, groups=groups,
                             precision=precision)
    strided = stride > 1 and dilation == 1 and groups == 1
    d_input = _strided_input_tangent(d_x, kernel, stride, padding, precision) if strided else conv(d_x, kernel)
    return conv(x, kernel), d_input + conv(stored(x, kernel), d_kernel)


def _strided_input_tangent(d_x: jax.Array, kernel: jax.Array, stride: int, padding: int,
                           precision: Any) -> jax.Array:
    """``conv(d_x, kernel)`` with ``stride``, written so that its transpose, the input gradient, is fast on XLA:CPU.

    The strided convolution is a sum over the input's ``stride**2`` phases (rows and columns ``r::stride``) of
    stride-1 convolutions with the kernel taps that land on that phase. Transposed, each is a stride-1
    convolution of the output gradient, scattered back into its phase: together no more arithmetic than the
    forward pass, where XLA's own input gradient convolves a gradient dilated with zeros (3/4 of it zeros at
    stride 2; resnet18's 3x3/2 at 56 px, batch 16: 7.4 ms against 4.8 on a 2-core AVX-512 EPYC).
    """
    n, h, w, _ = d_x.shape
    kh, kw, _, _ = kernel.shape
    out_h, out_w = _out_size(h, kh, stride, padding, 1), _out_size(w, kw, stride, padding, 1)
    total = None
    for rh in range(min(stride, h)):
        for rw in range(min(stride, w)):
            # Taps i with (i - padding - r) divisible by the stride read this phase, at offset (i - padding - r)
            # / stride from the output row: consecutive taps of one phase are `stride` apart, offsets 1 apart.
            taps_h = [i for i in range(kh) if (i - padding - rh) % stride == 0]
            taps_w = [j for j in range(kw) if (j - padding - rw) % stride == 0]
            if not taps_h or not taps_w:
                continue
            phase = lax.slice(d_x, (0, rh, rw, 0), d_x.shape, (1, stride, stride, 1))
            len_h, len_w = phase.shape[1:3]
            lo_h, lo_w = (taps_h[0] - padding - rh) // stride, (taps_w[0] - padding - rw) // stride
            pads = ((-lo_h, out_h - 1 + lo_h + len(taps_h) - 1 - (len_h - 1)),
                    (-lo_w, out_w - 1 + lo_w + len(taps_w) - 1 - (len_w - 1)))
            k = lax.slice(kernel, (taps_h[0], taps_w[0], 0, 0), (taps_h[-1] + 1, taps_w[-1] + 1, *kernel.shape[2:]),
                          (stride, stride, 1, 1))
            y = lax.conv_general_dilated(phase, k.astype(d_x.dtype), (1, 1), pads,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
            total = y if total is None else total + y
    if total is None:  # every tap reads padding only
        return jnp.zeros((n, out_h, out_w, kernel.shape[3]), d_x.dtype)
    return total


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5, 6))
def _xla_forward_matmul_grads(x: jax.Array, kernel: jax.Array, stride: int, padding: int, dilation: int,
                              groups: int, precision: Any) -> jax.Array:
    """XLA's convolution forward; its derivatives (so the input and kernel gradients) the patches-matmul form's."""
    return _xla_conv(x, kernel, stride, padding, dilation, groups, precision)


@_xla_forward_matmul_grads.defjvp
def _xmg_jvp(stride, padding, dilation, groups, precision, primals, tangents):
    x, kernel = primals
    d_x, d_kernel = tangents
    matmul = functools.partial(_matmul_conv, stride=stride, padding=padding, dilation=dilation, groups=groups,
                               precision=precision)
    return (_xla_conv(x, kernel, stride, padding, dilation, groups, precision),
            matmul(d_x, kernel) + matmul(x, d_kernel))


FORMS = {"xla": _xla_conv, "matmul": _matmul_conv, "matmul_grads": _xla_forward_matmul_grads}


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, **kwargs: Any) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` (as ``nnx.Conv(conv_general_dilated=...)`` calls it) routing
    square 2D NHWC/HWIO convolutions with symmetric padding through :func:`conv2d`; anything else goes to XLA."""
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    nhwc = dn == lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    strides, dil = tuple(window_strides), tuple(rhs_dilation or (1, 1))
    pads = None if isinstance(padding, str) else tuple(tuple(p) for p in padding)
    simple = (nhwc and lhs.ndim == 4 and len(set(strides)) == 1 and len(set(dil)) == 1 and pads is not None
              and len({p for pair in pads for p in pair}) == 1 and tuple(lhs_dilation or (1, 1)) == (1, 1)
              and batch_group_count == 1 and not any(v is not None for v in kwargs.values()))
    if not simple:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count, precision,
                                        **kwargs)
    return conv2d(lhs, rhs, strides[0], pads[0][0], dil[0], feature_group_count, precision)
