"""The report: memory a device, FLOPs, roofline, shardings and collectives of the compiled steps, as plain
data (:func:`build_report`, written to ``--workdir``/:data:`REPORT_FILE`) and as text (:func:`format_report`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from train.tpu_sizing.chips import chip_hbm, chip_of
from train.tpu_sizing.compile import Compiled
from train.tpu_sizing.count import collectives, forward_flops, summarise_collectives

REPORT_FILE = "compile_only.json"


def memory(compiled, extra_bytes: int = 0) -> dict[str, int]:
    """Per-device bytes: arguments, outputs not aliased to them, temporaries, code, prefetched batches."""
    m = compiled.memory_analysis()
    out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes - m.alias_size_in_bytes),
           "temporaries": int(m.temp_size_in_bytes), "code": int(m.generated_code_size_in_bytes),
           "prefetched": int(extra_bytes)}
    out["total"] = sum(out.values())
    return out


def shardings(compiled) -> dict[str, Any]:
    """How the compiled train step lays out its inputs and outputs over the mesh."""
    import jax

    (state, batch, *_), _ = compiled.input_shardings  # then the schedule values (train.steps.schedule_values)
    state_out, _ = compiled.output_shardings
    leaves = jax.tree.leaves(state)
    return {"state_replicated": all(s.is_fully_replicated for s in leaves),
            "state_out_replicated": all(s.is_fully_replicated for s in jax.tree.leaves(state_out)),
            "state_arrays": len(leaves), "batch": {k: str(s.spec) for k, s in batch.items()},
            "mesh": dict(leaves[0].mesh.shape)}


def cost(compiled) -> dict[str, float]:
    """XLA's cost analysis of a compiled step: FLOPs and bytes accessed, per device."""
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


def gib(b: float) -> str:
    """Bytes as ``1.23 GiB``."""
    return f"{b / 2**30:.2f} GiB"


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def format_report(r: dict[str, Any]) -> str:
    """The human-readable report."""
    chip = r["chip"]
    lines = [f"{r['arch']} ({r['dtype']}, {r['image_size']} px, {r['num_classes']} classes, {r['optimizer']}) "
             f"compiled for {r['topology']}: {r['devices']} x {r['device_kind']} on {r['hosts']} host(s), "
             f"global batch {r['global_batch']} ({r['per_device_batch']} per device), in {r['compile_seconds']:.0f} s"]
    hbm = f"{gib(r['hbm_per_device'])} HBM ({chip['source']})" if chip else "HBM unknown for this chip"
    lines.append(f"memory per device          train step   eval step    of {hbm}")
    for key in ("arguments", "outputs", "temporaries", "code", "prefetched", "total"):
        label = {"outputs": "outputs (not donated)", "prefetched": "prefetched batches (2)"}.get(key, key)
        lines.append(f"  {label:<24}{gib(r['memory']['train'][key]):>11}  {gib(r['memory']['eval'][key]):>11}")
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


def write_report(workdir: Path, report: dict[str, Any]) -> None:
    """``report`` as JSON in ``workdir``/:data:`REPORT_FILE`, written atomically."""
    from resnet_flax.atomic import atomic_write

    workdir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1, default=str)
    atomic_write(workdir / REPORT_FILE, lambda tmp: Path(tmp).write_text(text))
