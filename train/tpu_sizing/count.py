"""Counting what a step does: matmul FLOPs from the model's jaxpr, and collectives from the compiled HLO text."""

from __future__ import annotations

import math
import re
from typing import Any

# ------------------------------------------------------------------------------------------ FLOPs


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


# ------------------------------------------------------------------------------------------ collectives

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
