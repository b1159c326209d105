"""Per-shape convolution timings: XLA's convolution vs patches-matmul, for every conv a ResNet runs.

``python -m benchmarks.convs --arch resnet18 resnet50 --image-size 32 64 112 224`` lists each distinct
convolution of the model at that input size (batch 64, or 16 at 224 px), times its forward pass (compiled
with the inference options) and its forward + backward (input and kernel gradients, training options; the
stem's kernel gradient only) in every form of :data:`resnet_flax.conv.FORMS`, alternating, and prints the form
:func:`resnet_flax.conv.cpu_form` picks; the rule was set from this table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import resnet_flax
from resnet_flax import conv as C


@dataclass(frozen=True)
class Shape:
    """One convolution: NHWC input, square kernel, symmetric padding."""

    batch: int
    size: int  # input height = width
    cin: int
    cout: int
    kernel: int
    stride: int
    padding: int
    groups: int

    @property
    def out(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    def label(self) -> str:
        g = f" g{self.groups}" if self.groups > 1 else ""
        return (f"{self.kernel}x{self.kernel}/{self.stride} {self.cin}->{self.cout}{g} "
                f"{self.size}->{self.out}")


def model_convs(arch: str, image_size: int, batch: int) -> Counter[Shape]:
    """The distinct convolutions of ``arch`` at ``image_size`` with how often each runs (from the jaxpr)."""
    model = nnx.eval_shape(lambda: resnet_flax.create_model(arch))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    with C.conv_policy("xla"):
        jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    shapes: Counter[Shape] = Counter()
    for eqn in _eqns(jaxpr.jaxpr):
        if eqn.primitive.name != "conv_general_dilated":
            continue
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        p = eqn.params
        shapes[Shape(lhs[0], lhs[1], lhs[3], rhs[3], rhs[0], p["window_strides"][0], p["padding"][0][0],
                     p["feature_group_count"])] += 1
    return shapes


def _eqns(jaxpr) -> list:
    out = []
    for eqn in jaxpr.eqns:
        out.append(eqn)
        for sub in jax.core.jaxprs_in_params(eqn.params) if hasattr(jax.core, "jaxprs_in_params") else []:
            out.extend(_eqns(sub))
        for v in eqn.params.values():
            inner = getattr(v, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                out.extend(_eqns(inner))
    return out


def _functions(shape: Shape, policy: str, train: bool) -> Callable:
    def fwd(x, w):
        with C.conv_policy(policy):
            return C.conv2d(x, w, shape.stride, shape.padding, 1, shape.groups)

    if not train:
        return fwd

    def fwd_bwd(x, w, ct):
        if shape.cin <= 4:  # the stem: its input is the image, whose gradient nobody asks for
            _, back = jax.vjp(lambda w: fwd(x, w), w)
        else:
            _, back = jax.vjp(fwd, x, w)
        return back(ct)

    return fwd_bwd


def time_shape(shape: Shape, train: bool, reps: int) -> dict[str, float]:
    """Median seconds of each form of ``shape`` (fwd, or fwd+bwd when ``train``), alternating."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((shape.batch, shape.size, shape.size, shape.cin), np.float32))
    w = jnp.asarray(rng.standard_normal((shape.kernel, shape.kernel, shape.cin // shape.groups, shape.cout),
                                        np.float32) * 0.05)
    args = (x, w)
    if train:
        args += (jnp.asarray(rng.standard_normal((shape.batch, shape.out, shape.out, shape.cout), np.float32)),)
    options = C.cpu_compiler_options(C.CPU_TRAIN_OPTIONS if train else C.CPU_EVAL_OPTIONS)
    compiled = {}
    for policy in C.FORMS:
        fn = jax.jit(_functions(shape, policy, train), compiler_options=options)
        compiled[policy] = fn.lower(*args).compile()
        jax.block_until_ready(compiled[policy](*args))
    samples: dict[str, list[float]] = {p: [] for p in compiled}
    for _ in range(reps):
        for policy, fn in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples[policy].append(time.perf_counter() - t0)
    return {p: statistics.median(s) for p, s in samples.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Print the per-shape table (markdown) for the requested archs and sizes."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.convs", description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--image-size", type=int, nargs="+", default=[32, 64, 112, 224])
    p.add_argument("--batch", type=int, help="batch size (default 64, 16 at 224 px)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--mode", nargs="+", choices=["infer", "train"], default=["infer", "train"])
    p.add_argument("--max-map", type=int, help="only convolutions whose output map is at most this wide")
    args = p.parse_args(argv)
    forms = " / ".join(C.FORMS)
    print(f"| image | conv (input->output map) | used by | fwd ms {forms} | fwd+bwd ms {forms} | picks |")
    print("|---|---|---|---|---|---|")
    for size in args.image_size:
        batch = args.batch or (16 if size >= 224 else 64)
        users: dict[Shape, list[str]] = {}
        for arch in args.arch:
            for shape, count in model_convs(arch, size, batch).items():
                users.setdefault(shape, []).append(f"{arch.removeprefix('resnet')}x{count}")
        for shape in sorted(users, key=lambda s: (-s.size, s.kernel, s.cin, s.stride)):
            if (args.max_map and shape.out > args.max_map):
                continue
            cells = []
            for mode in ("infer", "train"):
                if mode not in args.mode:
                    cells.append("-")
                    continue
                t = time_shape(shape, mode == "train", args.reps)
                cells.append(" / ".join(f"{1e3 * v:.1f}" for v in t.values()))
            pick = C.cpu_form(shape.size, shape.cin, shape.kernel, shape.stride, shape.padding, 1, shape.groups)
            print(f"| {size} b{batch} | {shape.label()} | {' '.join(users[shape])} | {cells[0]} | {cells[1]} "
                  f"| {pick} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
