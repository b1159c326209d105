"""resnet_flax.conv: both convolution forms against float64, and which form each backend compiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_err

from resnet_flax import conv as C

# (batch, size, cin, cout, kernel, stride, padding, dilation, groups): every kind of conv the models run, at
# the small maps where the CPU switches to patches-matmul, and just past the switch.
SHAPES = {
    "3x3 2x2 map": (2, 2, 32, 48, 3, 1, 1, 1, 1),
    "3x3/2 4->2": (2, 4, 16, 32, 3, 2, 1, 1, 1),
    "3x3/2 odd 7->4": (2, 7, 8, 16, 3, 2, 1, 1, 1),
    "3x3 1x1 map": (3, 1, 16, 16, 3, 1, 1, 1, 1),
    "3x3/2 2->1": (2, 2, 16, 24, 3, 2, 1, 1, 1),
    "dilated 3x3 2x2 map": (2, 2, 8, 8, 3, 1, 2, 2, 1),
    "grouped 3x3 1x1 map": (2, 1, 16, 16, 3, 1, 1, 1, 4),
    "1x1/3 windows all padding": (2, 1, 4, 8, 1, 3, 2, 1, 1),
    "1x1 4x4": (2, 4, 32, 64, 1, 1, 0, 1, 1),
    "1x1/2 4->2": (2, 4, 32, 64, 1, 2, 0, 1, 1),
    "stem 7x7/2 8->4": (2, 8, 3, 16, 7, 2, 3, 1, 1),
    "stem 7x7/2 odd 9->5": (2, 9, 3, 16, 7, 2, 3, 1, 1),
    "grouped 3x3/2": (2, 6, 32, 32, 3, 2, 1, 1, 8),
    "grouped dilated 3x3": (2, 5, 16, 16, 3, 1, 2, 2, 4),
    "3x3 5x5 map": (2, 5, 16, 24, 3, 1, 1, 1, 1),
    "3x3/2 8->4": (2, 8, 16, 32, 3, 2, 1, 1, 1),
    "3x3/2 odd 9->5": (2, 9, 8, 16, 3, 2, 1, 1, 1),
    "1x1/2 odd 7->4": (2, 7, 16, 32, 1, 2, 0, 1, 1),
    "dilated 3x3 6x6 map": (2, 6, 8, 8, 3, 1, 2, 2, 1),
    "3x3 128->256 4x4 map": (1, 4, 128, 256, 3, 1, 1, 1, 1),
    "3x3/2 256->128 8->4": (1, 8, 256, 128, 3, 2, 1, 1, 1),
}


def torch_reference(x, w, ct, stride, padding, dilation, groups):
    """Output and (input, kernel) gradients of ``sum(conv(x, w) * ct)`` in float64 with PyTorch."""
    xt = torch.tensor(np.asarray(x, np.float64).transpose(0, 3, 1, 2), requires_grad=True)
    wt = torch.tensor(np.asarray(w, np.float64).transpose(3, 2, 0, 1), requires_grad=True)
    y = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=padding, dilation=dilation, groups=groups)
    (y * torch.tensor(np.asarray(ct, np.float64).transpose(0, 3, 1, 2))).sum().backward()
    return (y.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1),
            wt.grad.numpy().transpose(2, 3, 1, 0))


def forward_and_grads(policy, x, w, ct, stride, padding, dilation, groups):
    def f(x, w):
        with C.conv_policy(policy):
            return C.conv2d(x, w, stride, padding, dilation, groups)

    y, back = jax.vjp(jax.jit(f), x, w)
    return (y, *back(ct))


@pytest.mark.parametrize("name", list(SHAPES))
def test_other_forms_are_as_exact_as_xla_convolution(name):
    n, size, cin, cout, k, stride, padding, dilation, groups = SHAPES[name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, cin // groups, cout)), jnp.float32)
    out = (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    ct = jnp.asarray(rng.normal(size=(n, out, out, cout)), jnp.float32)
    ref = torch_reference(x, w, ct, stride, padding, dilation, groups)
    xla = forward_and_grads("xla", x, w, ct, stride, padding, dilation, groups)
    for form in ("matmul", "matmul_grads", "auto"):  # auto: this backend's choice, with its gradient rules
        got = forward_and_grads(form, x, w, ct, stride, padding, dilation, groups)
        for what, r, a, b in zip(("output", "input grad", "kernel grad"), ref, xla, got):
            assert a.shape == b.shape == r.shape, (form, what)
            # The noise is float32 rounding, measured by XLA's own convolution against float64 at this shape;
            # the floor is float32's epsilon (one rounding of an O(1) result, when XLA happens to be exact).
            bound = 4 * max(rel_err(a, r), np.finfo(np.float32).eps)
            assert rel_err(b, r) <= bound, (form, what, rel_err(b, r), rel_err(a, r))


def test_taps_that_only_meet_padding_are_left_out():
    assert C.live_taps(1, 3, 1, 1, 1) == [1] and C.live_taps(2, 3, 2, 1, 1) == [1, 2]
    assert C.live_taps(2, 3, 1, 1, 1) == [0, 1, 2] and C.live_taps(2, 3, 1, 2, 2) == [1]
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(4, 1, 1, 32)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 32, 16)), jnp.float32)

    def loss(x, w):
        with C.conv_policy("matmul"):
            return jnp.sum(C.conv2d(x, w, 1, 1) ** 2)

    # On a 1x1 map only the centre tap meets the input: the matmuls contract over its 32 channels, not 9 x 32,
    # and the other taps' kernel gradient is exactly zero, as plain autodiff gives.
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    assert "f32[4,32]" in hlo and "f32[4,288]" not in hlo
    _, dw = jax.grad(loss, argnums=(0, 1))(x, w)
    assert np.all(np.asarray(dw).reshape(9, -1)[[0, 1, 2, 3, 5, 6, 7, 8]] == 0)
    assert np.any(np.asarray(dw[1, 1]) != 0)


def ops(fn, *args, platform: str | None = None) -> str:
    """The StableHLO text of ``fn`` lowered for ``platform`` (default: this process's backend)."""
    traced = jax.jit(fn).trace(*args)
    lowered = traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()
    return lowered.as_text()


def test_each_backend_compiles_its_form():
    small = (jnp.zeros((2, 2, 2, 64)), jnp.zeros((3, 3, 64, 64)))
    big = (jnp.zeros((2, 32, 32, 8)), jnp.zeros((3, 3, 8, 8)))

    def f(x, w):
        return C.conv2d(x, w, 1, 1)

    assert C.cpu_form(2, 64, 3, 1, 1) == "matmul" and C.cpu_form(4, 64, 3, 2, 1) == "matmul"
    assert C.cpu_form(4, 64, 3, 1, 1) == "xla" and C.cpu_form(1, 64, 1) == "xla"
    assert C.cpu_form(64, 3, 7, 2, 3) == "xla"
    assert C.cpu_form(56, 128, 3, 1, 1, groups=32) == "matmul_grads" == C.cpu_form(2, 1024, 3, 1, 1, groups=32)
    assert "convolution" in ops(f, *big, platform="cpu") and "dot_general" not in ops(f, *big, platform="cpu")
    assert "dot_general" in ops(f, *small, platform="cpu") and "convolution" not in ops(f, *small, platform="cpu")
    # GPU and TPU keep XLA's convolution: only the CPU branch of platform_dependent is the matmul.
    gpu = ops(f, *small, platform="cuda")
    assert "convolution" in gpu and "dot_general" not in gpu
    with C.conv_policy("xla"):  # read at trace time: a new function, not f's cached trace
        assert "dot_general" not in ops(lambda x, w: C.conv2d(x, w, 1, 1), *small, platform="cpu")


@pytest.mark.parametrize(("size", "groups"), [(2, 1), (6, 1), (6, 4)],
                         ids=["matmul form", "xla form", "grouped: matmul gradients"])
def test_forward_mode_and_second_derivatives_match_xla_convolution(size, groups):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, size, size, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 8 // groups, 8)) * 0.2, jnp.float32)
    dx, dw = (jnp.asarray(rng.normal(size=a.shape), jnp.float32) for a in (x, w))

    def results():
        def f(x, w):
            return jnp.sum(jnp.tanh(C.conv2d(x, w, 1, 1, groups=groups)))

        _, tangent = jax.jvp(f, (x, w), (dx, dw))
        _, hvp = jax.jvp(jax.grad(f, argnums=(0, 1)), (x, w), (dx, dw))  # forward-over-reverse
        return [tangent, *hvp]

    with C.conv_policy("xla"):
        expected = results()
    for got, want in zip(results(), expected):
        assert rel_err(got, want) < 1e-5  # float32 sums in another order: ~1e-7, measured


def test_cpu_kernel_gradient_reads_the_stored_input():
    x, w = jnp.zeros((2, 8, 8, 4)), jnp.zeros((3, 3, 4, 4))

    def loss(x, w):
        return jnp.sum(C.conv2d(jax.nn.relu(x * 2.0 + 1.0), w, 1, 1))

    def compiled(fn):
        return jax.jit(fn).lower(x, w).compile().as_text()

    # The CPU gradient passes the input through an identity conditional (a buffer XLA's fusion cannot recompute
    # in transposed order); the forward pass has none. (Other backends take plain XLA convolutions, as above.)
    assert " conditional(" in compiled(jax.grad(loss, argnums=1))
    assert " conditional(" not in compiled(loss)


def test_nnx_conv_routes_through_the_chooser_and_falls_back_for_other_layouts():
    from flax import nnx

    from resnet_flax.layers import conv3x3

    layer = conv3x3(16, 16, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 2, 2, 16)), jnp.float32)
    assert layer.conv_general_dilated is C.conv_general_dilated
    assert "dot_general" in ops(lambda x: layer(x), x, platform="cpu")
    with C.conv_policy("xla"):
        expected = layer(x)
    assert rel_err(layer(x), expected) < 1e-6
    # 'SAME' padding (a string) is not PyTorch's symmetric padding: XLA's own convolution handles it.
    y = C.conv_general_dilated(x, layer.kernel[...], (1, 1), "SAME",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert rel_err(y, expected) < 1e-6


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="conv policy"), C.conv_policy("fast"):
        pass
