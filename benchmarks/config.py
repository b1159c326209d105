"""What one measurement runs: the implementation, the workload, and the Flax levers applied to it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from resnet_flax.conv import CPU_EVAL_OPTIONS, CPU_TRAIN_OPTIONS, YNN_OFF, YNN_REDUCE_ONLY, cpu_form

Mode = Literal["infer", "train"]
Framework = Literal["flax", "torch"]

# The levers name fixed XLA:CPU option sets (resnet_flax.conv): YNN_REDUCE_ONLY keeps YNNPACK for reductions only
# (Eigen convolutions, YNNPACK's BatchNorm reductions), YNN_OFF uses none. "flax-fast" compiles with the
# project's choice, CPU_TRAIN_OPTIONS / CPU_EVAL_OPTIONS (what python -m train and resnet_flax.inference_fn use).
FAST_MATH: dict[str, Any] = {"xla_cpu_enable_fast_math": True}


@dataclasses.dataclass(frozen=True)
class FlaxOptions:
    """Levers for the Flax side; the defaults are the plain model under ``jax.jit``."""

    fold_bn: bool = False  # inference: BatchNorm folded into the convolutions (resnet_flax.fuse)
    donate: bool = True  # training: donate the train state to the step (train.steps.jit_steps does)
    host_round_trip: bool = False  # training: batch from numpy each step and the loss read back (a real loop)
    cpu_compiler_options: tuple[tuple[str, Any], ...] = ()  # XLA options for this compile, on CPU only
    conv: str = "auto"  # resnet_flax.conv policy: "auto" (per-shape choice), "xla" (XLA's convs only), "matmul"
    retain_memory: bool = False  # CPU: train.host_memory's settings, as python -m train and train.predict set them

    @staticmethod
    def with_options(options: dict[str, Any], **kwargs: Any) -> FlaxOptions:
        """FlaxOptions whose XLA:CPU compiler options are ``options`` (kept as a hashable tuple)."""
        return FlaxOptions(cpu_compiler_options=tuple(sorted(options.items())), **kwargs)


@dataclasses.dataclass(frozen=True)
class Case:
    """One implementation on one workload; sent as JSON to a worker process."""

    impl: str  # the column name, e.g. "flax", "flax-fast", "torch", "torch.compile"
    framework: Framework
    arch: str
    mode: Mode
    batch: int
    image_size: int = 224
    dtype: str = "float32"
    flax: FlaxOptions = FlaxOptions()
    torch_compile: bool = False
    seed: int = 0
    steps_per_call: int = 1  # training: steps dispatched back to back in one timed call, one wait at the end

    def to_json(self) -> str:
        """One line of JSON (the worker's first stdin line)."""
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> Case:
        """The inverse of :meth:`to_json`."""
        d = json.loads(text)
        flax = d.pop("flax")
        flax["cpu_compiler_options"] = tuple(tuple(kv) for kv in flax["cpu_compiler_options"])
        return Case(flax=FlaxOptions(**flax), **d)


def resolve_dtype(requested: str, gpu: bool) -> str:
    """bf16 on GPU (torch runs AMP there), float32 on CPU, unless asked otherwise."""
    if requested != "auto":
        return requested
    return "bfloat16" if gpu else "float32"


# The Flax configurations compared in the main table: the plain model, and the fastest levers found here.
FLAX_PLAIN = FlaxOptions()
FLAX_FAST_INFER = FlaxOptions.with_options(CPU_EVAL_OPTIONS, fold_bn=True, retain_memory=True)
FLAX_FAST_TRAIN = FlaxOptions.with_options(CPU_TRAIN_OPTIONS, retain_memory=True)


def fast_options(mode: Mode) -> FlaxOptions:
    """The "flax-fast" levers for ``mode``."""
    return FLAX_FAST_INFER if mode == "infer" else FLAX_FAST_TRAIN


def without_conv_lever(opts: FlaxOptions) -> FlaxOptions:
    """``opts`` with every convolution left to XLA (the conv lever off)."""
    return dataclasses.replace(opts, conv="xla")


def conv_lever_applies(image_size: int) -> bool:
    """Whether resnet_flax.conv computes any ResNet convolution in another form than XLA's on CPU here.

    Candidates: the stem, and the 3x3 convolutions of the last stage (the smallest maps).
    """
    size = image_size
    for kernel, stride, pad in ((7, 2, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1)):  # stem, max-pool, layer2, layer3
        size = (size + 2 * pad - kernel) // stride + 1
    return cpu_form(image_size, 3, 7, 2, 3) != "xla" or cpu_form(size, 256, 3, 2, 1) != "xla"


# Each lever alone and stacked, for ``--levers``: name -> (modes it applies to, options). The training levers
# after "ynn-reduce-only" are stacked on it, so their effect is read against it.
_FAST_TRAIN_OPTIONS = YNN_REDUCE_ONLY
LEVERS: dict[str, tuple[tuple[str, ...], FlaxOptions]] = {
    "plain": (("infer", "train"), FLAX_PLAIN),
    "fold-bn": (("infer",), FlaxOptions(fold_bn=True)),
    "fast-math": (("infer", "train"), FlaxOptions.with_options(FAST_MATH)),
    "ynn-off": (("infer", "train"), FlaxOptions.with_options(YNN_OFF)),
    "ynn-off+fast-math": (("infer",), FlaxOptions.with_options({**YNN_OFF, **FAST_MATH})),
    "ynn-reduce-only": (("infer", "train"), FlaxOptions.with_options(YNN_REDUCE_ONLY)),
    "ynn-off+fold-bn": (("infer",), FlaxOptions.with_options(YNN_OFF, fold_bn=True)),
    "ynn-reduce-only+fold-bn": (("infer",), FlaxOptions.with_options(YNN_REDUCE_ONLY, fold_bn=True)),
    "ynn-reduce-only+no-donation": (("train",), FlaxOptions.with_options(_FAST_TRAIN_OPTIONS, donate=False)),
    "ynn-reduce-only+host-round-trip": (("train",),
                                        FlaxOptions.with_options(_FAST_TRAIN_OPTIONS, host_round_trip=True)),
    "ynn-reduce-only+xla-conv": (("train",), FlaxOptions.with_options(_FAST_TRAIN_OPTIONS, conv="xla")),
    "ynn-reduce-only+retain-memory": (("train",), FlaxOptions.with_options(_FAST_TRAIN_OPTIONS, retain_memory=True)),
}
