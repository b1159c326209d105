"""The Flax side: jitted inference (plain or BatchNorm-folded) and train.steps' jitted train_step."""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

import resnet_flax
from benchmarks.config import Case, FlaxOptions
from benchmarks.worker import Workload
from resnet_flax.conv import conv_policy
from resnet_flax.fuse import fold_batchnorm
from resnet_flax.io import load_flat_state
from resnet_flax.layers import COMPUTE_DTYPES
from train import steps
from train.host_memory import retain_freed_memory
from train.platforms import leave_out_absent_tpu


def random_model(arch: str, dtype: Any, seed: int, cls: type[resnet_flax.ResNet] = resnet_flax.ResNet
                 ) -> resnet_flax.ResNet:
    """``arch`` (as ``cls``) with He-scaled random weights and non-trivial BatchNorm state, filled from numpy.

    Same shapes and compute as ``create_model`` but seconds faster to build than its jax initialisers.
    """
    rng = np.random.default_rng(seed)
    config = resnet_flax.arch_config(arch)
    model = nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0)))
    arrays = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        key, shape = ".".join(str(p) for p in path), tuple(var.shape)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "kernel":
            arrays[key] = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape).astype(np.float32)
        elif leaf in ("scale", "var"):
            arrays[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif leaf == "num_batches_tracked":
            arrays[key] = np.zeros(shape, np.int32)
        else:
            arrays[key] = rng.normal(0.0, 0.1, shape).astype(np.float32)
    return load_flat_state(model, arrays)


def compiler_options(opts: FlaxOptions) -> dict[str, Any] | None:
    """The per-compile XLA options: only on the CPU backend, where they exist."""
    if jax.default_backend() != "cpu" or not opts.cpu_compiler_options:
        return None
    return dict(opts.cpu_compiler_options)


def compile_timed(jitted: Any, args: tuple, opts: FlaxOptions) -> tuple[Any, float]:
    """AOT-compile ``jitted`` for ``args`` with the case's XLA options; returns (executable, seconds)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile(compiler_options=compiler_options(opts))
    return compiled, time.perf_counter() - t0


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the accelerator (None on CPU, whose allocator keeps no such statistic)."""
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def random_batch(case: Case) -> dict[str, jax.Array]:
    """A device-resident batch: NHWC float32 images (normalised-like), labels and an all-ones mask."""
    rng = np.random.default_rng(case.seed + 1)
    shape = (case.batch, case.image_size, case.image_size, 3)
    return {"image": jax.device_put(rng.standard_normal(shape, np.float32)),
            "label": jax.device_put(rng.integers(0, 1000, case.batch).astype(np.int32)),
            "mask": jax.device_put(np.ones(case.batch, np.float32))}


def build_infer(case: Case) -> Workload:
    """Eval-mode forward under jit: the nnx model as is, or with BatchNorm folded into the convs."""
    model = random_model(case.arch, COMPUTE_DTYPES[case.dtype], case.seed)
    model.eval()
    if case.flax.fold_bn:
        apply_fn, params = fold_batchnorm(model)
    else:
        graphdef, params = nnx.split(model)

        def apply_fn(state: nnx.State, x: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, state)(x)
    images = random_batch(case)["image"]
    compiled, compile_s = compile_timed(jax.jit(apply_fn), (params, images), case.flax)

    def run() -> None:
        compiled(params, images).block_until_ready()

    return Workload(run, compile_s, str(jax.devices()[0]), device_peak_bytes)


def optim_config() -> steps.OptimConfig:
    """SGD with Nesterov momentum 0.9 and weight decay 1e-4 on kernels: the recipe the PyTorch side mirrors."""
    return steps.OptimConfig(optimizer="sgd", lr=0.1, warmup_steps=0, total_steps=10_000, weight_decay=1e-4,
                             momentum=0.9, nesterov=True, label_smoothing=0.0)


def build_train(case: Case) -> Workload:
    """train.steps' ``train_step`` under ``jax.jit`` (state donated unless the case says not to) on a fixed batch.

    Jitted here, not by ``steps.jit_steps``, whose CPU compile options would add to the case's: each case
    compiles with exactly its own options (``plain``: none)."""
    model = random_model(case.arch, COMPUTE_DTYPES[case.dtype], case.seed)
    cfg = optim_config()
    graphdef, state = steps.create_train_state(model, steps.make_optimizer(cfg))
    train_step = jax.jit(functools.partial(steps.train_step, graphdef, cfg),
                         donate_argnums=0 if case.flax.donate else ())
    values = jax.device_put(steps.schedule_values(cfg))  # the schedules' values: arguments of the step
    batch = random_batch(case)
    compiled, compile_s = compile_timed(train_step, (state, batch, values), case.flax)
    box = [state]
    host_batch = {k: np.asarray(v) for k, v in batch.items()}

    def run() -> None:
        for _ in range(case.steps_per_call):  # dispatched back to back, as a training loop does
            if case.flax.host_round_trip:  # what a naive loop does: numpy in, loss out, every step
                box[0], metrics = compiled(box[0], {k: jax.device_put(v) for k, v in host_batch.items()}, values)
                float(metrics["train_loss"])
            else:
                box[0], _ = compiled(box[0], batch, values)
        box[0] = jax.block_until_ready(box[0])

    return Workload(run, compile_s, str(jax.devices()[0]), device_peak_bytes)


def build(case: Case) -> Workload:
    """The Flax workload of ``case`` (traced under its convolution policy)."""
    leave_out_absent_tpu()
    if case.flax.retain_memory:
        retain_freed_memory()
    with conv_policy(case.flax.conv):
        return build_infer(case) if case.mode == "infer" else build_train(case)
