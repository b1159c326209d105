"""The run's train and eval steps, lowered on abstract state and compiled for a topology's devices.

The mesh, shardings and jitted ``train_step``/``eval_step`` come from the functions the real run calls
(:func:`train.mesh.make_mesh`, :func:`train.steps.build_steps`, :func:`train.mesh.batch_spec`); the state is
built abstractly (``jax.eval_shape``), so nothing is initialised.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

SCHEDULE_STEPS = 1000  # the lr schedule's length when --max-steps is not given (no dataset is read)


@dataclasses.dataclass
class Compiled:
    """Both compiled steps of one configuration and how long compiling took."""

    train: Any
    eval: Any
    seconds: float
    batch_bytes: int  # one global batch's bytes on each device
    params: int  # number of parameters
    batch_dtypes: dict[str, str] = dataclasses.field(default_factory=dict)  # what the steps were compiled for


class OutOfMemory(Exception):
    """XLA refused to compile: the step needs more HBM than the chip has (``used`` bytes, when it says)."""

    def __init__(self, used: float, message: str):
        super().__init__(message)
        self.used = used


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory(e: Exception) -> OutOfMemory | None:
    """XLA:TPU's "Ran out of memory in memory space hbm. Used 20.69G of 15.75G hbm." as :class:`OutOfMemory`;
    None for any other error."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    m = re.search(r"Used ([\d.]+)([KMGT]?)B? of ([\d.]+)([KMGT]?)B? hbm", text)
    used = float(m.group(1)) * _UNITS[m.group(2)] if m else math.inf
    return OutOfMemory(used, text.strip().splitlines()[0])


def compile_steps(cfg, devices: Sequence, num_classes: int, train_only: bool = False) -> Compiled:
    """The run's mesh, shardings and jitted steps over ``devices``, lowered on abstract state and compiled.

    Raises :class:`OutOfMemory` when XLA refuses a step for the HBM it needs."""
    import jax

    from train.mesh import batch_spec, check_batch_size, make_mesh
    from train.model_setup import initial_model
    from train.steps import OptimConfig, build_steps

    replicated, batch_sharding = make_mesh(devices)
    check_batch_size(cfg.batch_size, batch_sharding)
    optim = OptimConfig.for_run(cfg, cfg.max_steps or SCHEDULE_STEPS)
    steps: dict[str, Callable] = {}

    def init():  # traced only (jax.eval_shape): nothing is initialised on the CPU
        state, steps["train"], steps["eval"] = build_steps(initial_model(cfg, num_classes), optim, replicated,
                                                           batch_sharding)
        return state

    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), jax.eval_shape(init))
    batch = batch_spec(cfg.batch_size, cfg.image_size, batch_sharding)
    t0 = time.perf_counter()
    try:
        train = steps["train"].lower(state, batch).compile()
        evaluate = None if train_only else steps["eval"].lower(
            state, batch_spec(cfg.batch_size, cfg.val_crop_size or cfg.image_size, batch_sharding)).compile()
    except Exception as e:  # XLA:TPU checks the HBM it needs while compiling
        oom = out_of_memory(e)
        if oom is None:
            raise
        raise oom from None
    batch_bytes = sum(math.prod(b.shape) * b.dtype.itemsize for b in batch.values()) // len(devices)
    params = sum(math.prod(p.shape) for p in jax.tree.leaves(state.params))
    return Compiled(train, evaluate, time.perf_counter() - t0, batch_bytes, params,
                    {k: str(b.dtype) for k, b in batch.items()})
