"""``python -m train --compile-only --topology v5e:2x4``: the run's steps compiled for a TPU and sized, no TPU needed.

The mesh, shardings and jitted ``train_step``/``eval_step`` come from the functions the real run calls
(:func:`train.mesh.make_mesh`, :func:`train.steps.build_steps`, :func:`train.mesh.batch_spec`), over the
devices of a TPU topology that libtpu describes without the hardware. The state is built abstractly
(``jax.eval_shape``), then both steps are lowered and compiled and the executables report memory, FLOPs
and collectives. ``python -m train`` never loads libtpu for this: it re-runs the command as
``python -m train.compile_only`` in a child with :data:`ISOLATION_ENV`, under ``unshare -n`` (no network)
where the kernel allows it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

# libtpu reads these when it loads; the child sets them before JAX touches a backend.
ISOLATION_ENV = {
    "JAX_PLATFORMS": "cpu",  # no TPU client: the topology is described, never opened
    "TPU_SKIP_MDS_QUERY": "1",  # never ask the GCE metadata server for the accelerator type or workers
    "TPU_WORKER_HOSTNAMES": "localhost",  # otherwise looked up (metadata server) and warned about
    "TPU_WORKER_ID": "0",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # no /tmp/libtpu_lockfile: compiles run beside other JAX processes
    "TPU_STDERR_LOG_LEVEL": "3",
    "TPU_MIN_LOG_LEVEL": "3",
    "GRPC_VERBOSITY": "ERROR",
    "ENABLE_RUNTIME_UPTIME_TELEMETRY": "0",
}
REPORT_FILE = "compile_only.json"
SCHEDULE_STEPS = 1000  # the lr schedule's length when --max-steps is not given (no dataset is read)


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's peak bf16 FLOP/s, HBM capacity (bytes) and HBM bandwidth (bytes/s)."""

    name: str
    peak_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    source: str


# Per chip, from each generation's "System architecture" table in the Google Cloud TPU docs
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e); capacities in the docs' own units (GiB for v4, GB else).
CHIPS = {
    "TPU v4": Chip("v4", 275e12, 32 * 2**30, 1200e9, "cloud.google.com/tpu/docs/v4"),
    "TPU v5 lite": Chip("v5e", 197e12, 16e9, 819e9, "cloud.google.com/tpu/docs/v5e"),
    "TPU v5": Chip("v5p", 459e12, 95e9, 2765e9, "cloud.google.com/tpu/docs/v5p"),
    "TPU v6 lite": Chip("v6e", 918e12, 32e9, 1638e9, "cloud.google.com/tpu/docs/v6e"),
}
ACCELERATOR_TYPES = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}  # topology prefix -> type
CORES_PER_CHIP = {"v4": 2, "v5p": 2}  # accelerator types count TensorCores on these


# ------------------------------------------------------------------------------------------ the child's env


@cache
def no_network_prefix() -> tuple[str, ...]:
    """``unshare -n`` (root) or ``unshare -rn`` (a user namespace) when the kernel allows, else nothing."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for flags in (("-n",), ("-r", "-n")):
        try:
            ok = subprocess.run([unshare, *flags, "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return (unshare, *flags)
    return ()


def isolation_env(topology: str | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default os.environ) plus :data:`ISOLATION_ENV` and a ``TPU_ACCELERATOR_TYPE`` for ``topology``."""
    env = dict(os.environ if base is None else base)
    env.update(ISOLATION_ENV)
    accel = accelerator_type(topology) if topology else None
    if accel:
        env["TPU_ACCELERATOR_TYPE"] = accel
    return env


def accelerator_type(topology: str) -> str | None:
    """``v5e:2x4`` -> ``v5litepod-8`` (what libtpu would ask the metadata server for), None if unknown."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)[:=_]([0-9x]+)(?:_(?:un)?twisted)?", topology)
    if not m:
        return None
    chips = math.prod(int(d) for d in m.group(2).split("x"))
    return f"{ACCELERATOR_TYPES[m.group(1)]}-{chips * CORES_PER_CHIP.get(m.group(1), 1)}"


def run_isolated(argv: Sequence[str], topology: str | None) -> int:
    """``python -m train.compile_only ARGV`` in a child without network and with libtpu kept offline."""
    cmd = [*no_network_prefix(), sys.executable, "-m", "train.compile_only", *argv]
    return subprocess.run(cmd, env=isolation_env(topology)).returncode


# ------------------------------------------------------------------------------------------ compiling


@dataclasses.dataclass
class Compiled:
    """Both compiled steps of one configuration and how long compiling took."""

    train: Any
    eval: Any
    seconds: float
    batch_bytes: int  # one global batch's bytes on each device
    params: int  # number of parameters
    batch_dtypes: dict[str, str] = dataclasses.field(default_factory=dict)  # what the steps were compiled for


def topology_devices(name: str) -> list:
    """The devices of TPU topology ``name`` (e.g. ``v5e:2x4``, ``v5p:2x2x1``), described by libtpu."""
    from jax.experimental import topologies

    from train.errors import RunError

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # libtpu missing or a name it rejects
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"--topology {name}: {msg}; give one like v5e:2x4, v5p:2x2x1, v6e:4x4 or v4:2x2x1 "
                       "(needs libtpu: pip install -e '.[tpu]')") from None


class OutOfMemory(Exception):
    """XLA refused to compile: the step needs more HBM than the chip has (``used`` bytes, when it says)."""

    def __init__(self, used: float, message: str):
        super().__init__(message)
        self.used = used


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _out_of_memory(e: Exception) -> OutOfMemory | None:
    """XLA:TPU's "Ran out of memory in memory space hbm. Used 20.69G of 15.75G hbm." as :class:`OutOfMemory`."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    m = re.search(r"Used ([\d.]+)([KMGT]?)B? of ([\d.]+)([KMGT]?)B? hbm", text)
    used = float(m.group(1)) * _UNITS[m.group(2)] if m else math.inf
    return OutOfMemory(used, text.strip().splitlines()[0])


def compile_steps(cfg, devices: Sequence, num_classes: int, train_only: bool = False) -> Compiled:
    """The run's mesh, shardings and jitted steps over ``devices``, lowered on abstract state and compiled."""
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
        evaluate = None if train_only else steps["eval"].lower(state, batch).compile()
    except Exception as e:  # XLA:TPU checks the HBM it needs while compiling
        oom = _out_of_memory(e)
        if oom is None:
            raise
        raise oom from None
    batch_bytes = sum(math.prod(b.shape) * b.dtype.itemsize for b in batch.values()) // len(devices)
    params = sum(math.prod(p.shape) for p in jax.tree.leaves(state.params))
    return Compiled(train, evaluate, time.perf_counter() - t0, batch_bytes, params,
                    {k: str(b.dtype) for k, b in batch.items()})


def forward_flops(cfg, num_classes: int) -> dict[str, float]:
    """Conv + fc FLOPs (2 x multiply-adds) of one image's forward pass, counted from the jaxpr's shapes.

    ``dense`` counts every kernel tap (torchvision's GFLOPs); ``valid`` skips taps that land in the zero
    padding, as XLA's cost analysis does; ``first_valid`` is the first convolution's share (its input
    gradient, the images', is never computed).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from resnet_flax.conv import conv_policy
    from train.model_setup import initial_model

    graphdef, state = nnx.split(nnx.eval_shape(lambda: initial_model(cfg, num_classes)))

    def forward(state, x):
        model = nnx.merge(graphdef, state)
        model.eval()
        return model(x)

    image = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    with conv_policy("xla"):  # the convolutions a TPU runs (the CPU's matmul form would be counted besides)
        counts = list(_matmul_flops(jax.make_jaxpr(forward)(state, image).jaxpr))
    return {"dense": float(sum(d for d, _ in counts)), "valid": float(sum(v for _, v in counts)),
            "first_valid": float(counts[0][1])}


def _valid_taps(size: int, out: int, k: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int) -> int:
    """(output position, kernel tap) pairs of one spatial dimension that read the input, not its padding."""
    extent = (size - 1) * lhs_dil + 1
    return sum(1 for o in range(out) for t in range(k)
               if 0 <= (p := o * stride + t * rhs_dil - pad_lo) < extent and p % lhs_dil == 0)


def _matmul_flops(jaxpr) -> Any:
    """(dense, valid) FLOPs of every convolution and dot_general, in program order (sub-jaxprs included)."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            lhs, rhs, out = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
            p = eqn.params
            ls, rs, os_ = p["dimension_numbers"]
            per_position = 2 * lhs[ls[0]] * out[os_[1]] * rhs[rs[1]]  # batch x out channels x in channels/groups
            dense, valid = per_position, per_position
            for i in range(len(ls) - 2):
                k = rhs[rs[2 + i]]
                dense *= out[os_[2 + i]] * k
                valid *= _valid_taps(lhs[ls[2 + i]], out[os_[2 + i]], k, p["window_strides"][i], p["padding"][i][0],
                                     p["lhs_dilation"][i], p["rhs_dilation"][i])
            yield dense, valid
        elif eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            flops = 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
            yield flops, flops
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, ClosedJaxpr):
                    yield from _matmul_flops(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    yield from _matmul_flops(sub)


# ------------------------------------------------------------------------------------------ reading the HLO

_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|"
                         r"collective-broadcast)(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8\w*)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16}


def _array_bytes(types: str) -> list[int]:
    sizes = []
    for dtype, dims in _ARRAY.findall(types):
        bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
        sizes.append(math.prod(int(d) for d in dims.split(",") if d) * bits // 8)
    return sizes


def _group_size(line: str, num_devices: int) -> int:
    """Devices taking part in each group of a collective's ``replica_groups`` (all of them if none is given)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"source_target_pairs=\{", line)
    return 2 if m else num_devices


def collectives(hlo: str, num_devices: int) -> list[dict[str, Any]]:
    """Each collective of an optimised HLO module: kind, bytes, devices per group and the JAX op it came from."""
    found = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:  # (an async collective's "-done" half never matches: it is counted at its "-start")
            continue
        sizes = _array_bytes(m.group(1))
        if m.group(3) and m.group(2) != "all-reduce":  # async start: (operands, outputs, ...)
            sizes = sizes[len(sizes) // 2:]
        op = re.search(r'op_name="([^"]*)"', line)
        found.append({"kind": m.group(2), "bytes": sum(sizes), "group": _group_size(line, num_devices),
                      "dtypes": sorted({dtype for dtype, _ in _ARRAY.findall(m.group(1))}),
                      "op": op.group(1) if op else ""})
    return found


def summarise_collectives(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """kind -> count, bytes, group sizes, and (for training) how many sit in the forward / backward pass."""
    out: dict[str, dict[str, Any]] = {}
    for c in found:
        s = out.setdefault(c["kind"], {"count": 0, "bytes": 0, "groups": set(), "forward": 0, "backward": 0,
                                       "other": 0})
        s["count"] += 1
        s["bytes"] += c["bytes"]
        s["groups"].add(c["group"])
        where = "backward" if "transpose(" in c["op"] else "forward" if "jvp(" in c["op"] else "other"
        s[where] += 1
    for s in out.values():
        s["groups"] = sorted(s["groups"])
    return out


# ------------------------------------------------------------------------------------------ the report


def memory(compiled, extra_bytes: int = 0) -> dict[str, int]:
    """Per-device bytes: arguments, outputs not aliased to them, temporaries, code, prefetched batches."""
    m = compiled.memory_analysis()
    out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes - m.alias_size_in_bytes),
           "temporaries": int(m.temp_size_in_bytes), "code": int(m.generated_code_size_in_bytes),
           "prefetched": int(extra_bytes)}
    out["total"] = sum(out.values())
    return out


def chip_hbm(devices: Sequence) -> float | None:
    """HBM bytes per device (a v4 chip's two TensorCores share its HBM)."""
    chip, per_chip = chip_of(devices)
    return chip.hbm_bytes / per_chip if chip else None


def chip_of(devices: Sequence) -> tuple[Chip | None, int]:
    """(the chip's specs, devices per chip): v4 topologies list each TensorCore as a device."""
    chip = CHIPS.get(devices[0].device_kind)
    chips = len({tuple(getattr(d, "coords", (d.id,))) for d in devices})
    return chip, max(1, len(devices) // max(chips, 1))


def shardings(compiled) -> dict[str, Any]:
    """How the compiled train step lays out its inputs and outputs over the mesh."""
    import jax

    (state, batch), _ = compiled.input_shardings
    state_out, _ = compiled.output_shardings
    leaves = jax.tree.leaves(state)
    return {"state_replicated": all(s.is_fully_replicated for s in leaves),
            "state_out_replicated": all(s.is_fully_replicated for s in jax.tree.leaves(state_out)),
            "state_arrays": len(leaves), "batch": {k: str(s.spec) for k, s in batch.items()},
            "mesh": dict(leaves[0].mesh.shape)}


def cost(compiled) -> dict[str, float]:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca or {}
    return {"flops": float(ca.get("flops", 0.0)), "bytes_accessed": float(ca.get("bytes accessed", 0.0))}


def fixed_bytes(m: dict[str, int]) -> int:
    """Of a step's per-device memory (:func:`memory`), the bytes that do not grow with the batch."""
    from train.mesh import PREFETCH_BATCHES

    return m["arguments"] - m["prefetched"] // PREFETCH_BATCHES + m["code"]


def build_report(cfg, topology: str, devices: Sequence, compiled: Compiled, num_classes: int) -> dict[str, Any]:
    """Everything ``--compile-only`` prints, as plain data (also written to ``--workdir``/compile_only.json)."""
    from train.mesh import PREFETCH_BATCHES

    n = len(devices)
    chip, per_chip = chip_of(devices)
    hbm = chip_hbm(devices)
    mem = {"train": memory(compiled.train, PREFETCH_BATCHES * compiled.batch_bytes),
           "eval": memory(compiled.eval, PREFETCH_BATCHES * compiled.batch_bytes)}
    peak = max(m["total"] for m in mem.values())
    train_cost = cost(compiled.train)
    flops_step = train_cost["flops"] * n
    fwd = forward_flops(cfg, num_classes)
    analytic = 3 * fwd["valid"] - fwd["first_valid"]  # forward, input and kernel gradients; none for the images
    coll = collectives(compiled.train.as_text(), n)
    report: dict[str, Any] = {
        "arch": cfg.resolved_arch, "dtype": cfg.dtype, "image_size": cfg.image_size, "num_classes": num_classes,
        "optimizer": cfg.optimizer, "params": compiled.params, "topology": topology,
        "device_kind": devices[0].device_kind, "devices": n,
        "chips": n // per_chip, "hosts": len({d.process_index for d in devices}), "global_batch": cfg.batch_size,
        "per_device_batch": cfg.batch_size // n, "compile_seconds": round(compiled.seconds, 1),
        "memory": mem, "hbm_per_device": hbm, "fits": None if hbm is None else peak <= hbm,
        "flops_per_device_step": train_cost["flops"], "flops_per_step": flops_step,
        "flops_per_image": flops_step / cfg.batch_size, "analytic_flops_per_image": analytic,
        "forward_flops_per_image": fwd["valid"], "forward_dense_flops_per_image": fwd["dense"],
        "bytes_accessed_per_device_step": train_cost["bytes_accessed"],
        "eval_flops_per_image": cost(compiled.eval)["flops"] * n / cfg.batch_size,
        "collectives": summarise_collectives(coll),
        "eval_collectives": summarise_collectives(collectives(compiled.eval.as_text(), n)),
        "chip": dataclasses.asdict(chip) if chip else None,
        "shardings": shardings(compiled.train), "batch_dtypes": compiled.batch_dtypes,
    }
    if chip:
        compute = n * chip.peak_flops / per_chip / report["flops_per_image"]
        traffic = report["per_device_batch"] * chip.hbm_bandwidth / per_chip / max(train_cost["bytes_accessed"], 1)
        traffic *= n
        report["roofline"] = {"compute_images_per_s": compute, "hbm_images_per_s": traffic,
                              "images_per_s": min(compute, traffic)}
    return report


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def format_report(r: dict[str, Any]) -> str:
    """The human-readable report."""
    chip = r["chip"]
    lines = [f"{r['arch']} ({r['dtype']}, {r['image_size']} px, {r['num_classes']} classes, {r['optimizer']}) "
             f"compiled for {r['topology']}: {r['devices']} x {r['device_kind']} on {r['hosts']} host(s), "
             f"global batch {r['global_batch']} ({r['per_device_batch']} per device), in {r['compile_seconds']:.0f} s"]
    hbm = f"{_gib(r['hbm_per_device'])} HBM ({chip['source']})" if chip else "HBM unknown for this chip"
    lines.append(f"memory per device          train step   eval step    of {hbm}")
    for key in ("arguments", "outputs", "temporaries", "code", "prefetched", "total"):
        label = {"outputs": "outputs (not donated)", "prefetched": "prefetched batches (2)"}.get(key, key)
        lines.append(f"  {label:<24}{_gib(r['memory']['train'][key]):>11}  {_gib(r['memory']['eval'][key]):>11}")
    if r["fits"] is not None:
        lines.append("  fits" if r["fits"] else "  DOES NOT FIT")
    dev = r["flops_per_image"] / r["analytic_flops_per_image"] - 1
    lines.append(f"FLOPs: {r['flops_per_step']:.3e} per step ({r['flops_per_device_step']:.3e} per device), "
                 f"{r['flops_per_image'] / 1e9:.2f} GFLOPs per image (analytic, 3 x forward conv+fc: "
                 f"{r['analytic_flops_per_image'] / 1e9:.2f}, {100 * dev:+.1f}%); eval "
                 f"{r['eval_flops_per_image'] / 1e9:.2f} (forward conv+fc: {r['forward_flops_per_image'] / 1e9:.2f};"
                 f" {r['forward_dense_flops_per_image'] / 1e9:.2f} counting the taps on zero padding)")
    if chip:
        rf = r["roofline"]
        lines.append(f"roofline: {rf['images_per_s']:,.0f} images/s ({r['chips']} chips x "
                     f"{chip['peak_flops'] / 1e12:.0f} TFLOP/s bf16 / FLOPs per image: "
                     f"{rf['compute_images_per_s']:,.0f}; HBM traffic at {chip['hbm_bandwidth'] / 1e9:.0f} GB/s: "
                     f"{rf['hbm_images_per_s']:,.0f})")
    for title, colls in (("train", r["collectives"]), ("eval", r["eval_collectives"])):
        if not colls:
            lines.append(f"collectives per {title} step: none")
            continue
        parts = []
        for kind, s in colls.items():
            where = f": {s['forward']} forward, {s['backward']} backward, {s['other']} other" \
                if title == "train" else ""
            parts.append(f"{kind} x{s['count']} ({_mib(s['bytes'])}{where}; groups of {s['groups']} devices)")
        lines.append(f"collectives per {title} step: " + "; ".join(parts))
    return "\n".join(lines)


def train_step_bytes(cfg, devices: Sequence, num_classes: int, batch_size: int) -> float:
    """Per-device bytes of the train step compiled at global ``batch_size`` (XLA's own count if it refuses)."""
    from train.mesh import PREFETCH_BATCHES

    try:
        c = compile_steps(dataclasses.replace(cfg, batch_size=batch_size), devices, num_classes, train_only=True)
    except OutOfMemory as e:
        return e.used
    return memory(c.train, PREFETCH_BATCHES * c.batch_bytes)["total"]


def search_largest_batch(cfg, devices: Sequence, num_classes: int, report: dict[str, Any],
                         log: Callable[[str], None]) -> int:
    """:func:`largest_fitting_batch` by compiling, from ``report``'s compile at ``cfg.batch_size``; each try is
    logged as it finishes and kept in ``report["search_compiles"]`` (global batch -> bytes a device)."""
    hbm = report["hbm_per_device"]
    peak = max(m["total"] for m in report["memory"].values())
    train = report["memory"]["train"]
    fixed = fixed_bytes(train) if "arguments" in train else 0.0  # XLA refused the first compile: total only
    tried: dict[int, float] = report.setdefault("search_compiles", {})

    def used(b: int) -> float:
        t0 = time.perf_counter()
        m = tried[b] = train_step_bytes(cfg, devices, num_classes, b)
        log(f"  --batch-size {b}: {_gib(m) if math.isfinite(m) else 'more than XLA can place'} a device, "
            f"{'fits' if m <= hbm else 'too big'} ({time.perf_counter() - t0:.0f} s)")
        return m

    return largest_fitting_batch(len(devices), used, hbm, {cfg.batch_size: peak}, fixed)


def largest_fitting_batch(num_devices: int, used: Callable[[int], float], hbm: float,
                          known: dict[int, float], fixed: float = 0.0) -> int:
    """The largest multiple of the device count that fits, found by compiling (compiles are deterministic).

    ``used(b)`` is the per-device bytes at global batch ``b`` (the train step's: evaluating needs less),
    ``known`` the batches already compiled and ``fixed`` the bytes that do not grow with the batch (state,
    code) when known. Memory grows almost linearly with the batch, so each next try is read off the line
    through the two nearest known points (the first through ``fixed`` at batch 0), inside the bracket
    [fits, too big]: a few compiles in all. 0 when not even one image per device fits.
    """
    n = num_devices
    mem = {b // n: m for b, m in known.items()}  # in units of n images
    while True:
        fit = [u for u, m in mem.items() if m <= hbm]
        over = [u for u, m in mem.items() if m > hbm]
        lo, hi = max(fit, default=0), min(over, default=None)
        if hi is not None and hi - lo <= 1:
            return lo * n
        pts = sorted(mem.items(), key=lambda um: abs(um[1] - hbm))[:2]
        if len(pts) == 2 and pts[0][1] != pts[1][1]:
            (u1, m1), (u2, m2) = pts
            guess = int(u1 + (hbm - m1) * (u2 - u1) / (m2 - m1))
        else:
            u1, m1 = pts[0]
            base = fixed if 0 <= fixed < min(m1, hbm) else 0.0
            guess = int(u1 * (hbm - base) / (m1 - base))
        guess = max(lo + 1, guess if hi is None else min(hi - 1, guess))
        if guess in mem:  # the line points at a tried batch: halve the bracket instead
            guess = lo + 1 if hi is None else (lo + hi) // 2
            guess = guess if guess not in mem else max(mem) + 1
        mem[guess] = used(guess * n)


# ------------------------------------------------------------------------------------------ entry points


def main(argv: Sequence[str] | None = None) -> int:
    """The child: compile, print the report, exit 2 (with the largest batch that fits) when it does not fit."""
    from train.config import parse_config

    cfg = parse_config(argv)
    os.environ.update(isolation_env(cfg.topology, {}))  # before libtpu loads (at the topology query)
    import jax

    jax.config.update("jax_platforms", "cpu")  # jax was imported (by the config) before the env was set
    from resnet_flax.errors import WeightsError
    from train.data import count_classes
    from train.errors import DataError, RunError

    try:
        devices = topology_devices(cfg.topology)
        num_classes = count_classes(cfg.dataset, cfg.data_dir, str(cfg.tfds_data_dir) if cfg.tfds_data_dir else None)
        try:
            compiled = compile_steps(cfg, devices, num_classes)
        except OutOfMemory as e:
            report = {"topology": cfg.topology, "global_batch": cfg.batch_size, "fits": False, "xla_error": str(e),
                      "memory": {"train": {"total": e.used}}, "hbm_per_device": chip_hbm(devices)}
        else:
            report = build_report(cfg, cfg.topology, devices, compiled, num_classes)
            print(format_report(report), flush=True)
    except (DataError, RunError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report["fits"] is False:
        print(f"--batch-size {cfg.batch_size} does not fit in {_gib(report['hbm_per_device'])} a device; searching "
              "for the largest global batch that does, one compile a try:", flush=True)
        report["largest_fitting_batch"] = search_largest_batch(cfg, devices, num_classes, report,
                                                               lambda line: print(line, flush=True))
    _write(cfg, report)
    if report["fits"] is False:
        largest = report["largest_fitting_batch"]
        fix = f"pass --batch-size {largest} or less (the largest global batch that fits)" if largest else \
            f"not even {len(devices)} (one image per device) fits: use a larger slice"
        needs = max(m["total"] for m in report["memory"].values())
        needs_text = _gib(needs) if math.isfinite(needs) else "more HBM than it has"
        print(f"error: --batch-size {cfg.batch_size} needs {needs_text} per device, more than the "
              f"{_gib(report['hbm_per_device'])} of HBM on {cfg.topology}; {fix}", file=sys.stderr)
        return 2
    return 0


def _write(cfg, report: dict[str, Any]) -> None:
    from resnet_flax.atomic import atomic_write

    cfg.workdir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1, default=str)
    atomic_write(cfg.workdir / REPORT_FILE, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    sys.exit(main())
