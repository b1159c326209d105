"""``python -m benchmarks.tpu_table``: the README's TPU sizing table, from ``--compile-only`` compiles (no TPU).

For each architecture and single-host slice: the train step compiled at 128 images a chip (memory per chip,
FLOPs per image, roofline, collectives), then the largest global batch that fits (found by compiling), and
one pod-scale multi-host compile. Each compile runs in its own child, isolated as ``--compile-only`` is
(:func:`train.tpu_sizing.run_isolated`'s environment, no network). Slow on a small machine: run it niced.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from train.tpu_sizing import isolation_env, no_network_prefix

ARCHS = ("resnet18", "resnet34", "resnet50")
SLICES = {"v5e-8": "v5e:2x4", "v6e-8": "v6e:2x4", "v5p-8": "v5p:2x2x1"}
POD = ("resnet50", "v5e-256", "v5e:16x16")
PER_CHIP = 128
IMAGE_SIZE = 224
CLASSES = 1000  # the ImageNet head


def _config(arch: str, topology: str, batch: int):
    from train.config import parse_config

    return parse_config(["--arch", arch, "--dtype", "bfloat16", "--image-size", str(IMAGE_SIZE), "--batch-size",
                         str(batch), "--dataset", "synthetic", "--compile-only", "--topology", topology])


def child(arch: str, topology: str, per_chip: int) -> dict[str, Any]:
    """One configuration, in the isolated child: the report at ``per_chip`` images a chip."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    from train import tpu_sizing as ts

    devices = ts.topology_devices(topology)
    _, per_device = ts.chip_of(devices)
    cfg = _config(arch, topology, per_chip * len(devices) // per_device)
    compiled = ts.compile_steps(cfg, devices, CLASSES)
    return ts.build_report(cfg, topology, devices, compiled, CLASSES)


def search_child(row: dict[str, Any]) -> dict[str, Any]:
    """The largest global batch that fits, in the isolated child, starting from ``row``'s compile."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    from train import tpu_sizing as ts

    devices = ts.topology_devices(row["topology"])
    cfg = _config(row["arch"], row["topology"], row["global_batch"])
    t0 = time.perf_counter()
    row = {**row, "search_compiles": {}}
    best = ts.search_largest_batch(cfg, devices, CLASSES, row, lambda line: print(line, file=sys.stderr, flush=True))
    return {"largest_fitting_batch": best, "search_compiles": row["search_compiles"],
            "search_seconds": round(time.perf_counter() - t0, 1)}


def run_child(*args: str) -> dict[str, Any]:
    """``child`` (arch, topology) or ``search_child`` (a row's JSON) in an isolated process, no network."""
    topology = args[1] if args[0] == "report" else json.loads(args[1])["topology"]
    cmd = [*no_network_prefix(), sys.executable, "-m", "benchmarks.tpu_table", "--child", *args]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=isolation_env(topology), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(args)[:200]} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["search_wall_seconds" if args[0] == "search" else "wall_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _collectives(r: dict[str, Any]) -> str:
    parts = []
    for kind, s in r["collectives"].items():
        parts.append(f"{s['count']} {kind}, {s['bytes'] / 2**20:.0f} MiB")
    return ", ".join(parts)


def _groups(r: dict[str, Any]) -> list[int]:
    return sorted({g for s in r["collectives"].values() for g in s["groups"]})


def _largest(r: dict[str, Any]) -> str:
    """The searched largest batch (how many compiles it took), else the line's estimate, labelled."""
    if "largest_fitting_batch" in r:
        return f"{r['largest_fitting_batch']:,} ({len(r['search_compiles'])} compiles)"
    from train.tpu_sizing import fixed_bytes

    m, n = r["memory"]["train"], r["devices"]
    fixed = fixed_bytes(m)
    per_image = (m["total"] - fixed) / r["per_device_batch"]
    return f"~{int((r['hbm_per_device'] - fixed) // per_image) * n:,} (est.)"


def _input_mark(r: dict[str, Any]) -> str:
    """A dagger on rows compiled for other input batches than a run feeds (float32, before runs fed uint8)."""
    return "" if r["batch_dtypes"] == batch_dtypes() else " †"


def markdown(rows: list[tuple[str, dict[str, Any]]], pod: dict[str, Any] | None) -> str:
    """The README's table (and the pod-scale line)."""
    lines = ["| arch | slice | memory/chip (args + temps) | of HBM | largest global batch that fits "
             "| GFLOPs/image XLA (analytic) | roofline img/s: bound (compute; HBM traffic) | collectives/step "
             "| compile |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        m = r["memory"]["train"]
        rf = r["roofline"]
        lines.append(
            f"| {r['arch']} | {name} (`{r['topology']}`) | {m['total'] / 2**30:.2f} GiB{_input_mark(r)} "
            f"({m['arguments'] / 2**30:.2f} + {m['temporaries'] / 2**30:.2f}) | {r['hbm_per_device'] / 2**30:.1f} GiB "
            f"| {_largest(r)} | {r['flops_per_image'] / 1e9:.2f} ({r['analytic_flops_per_image'] / 1e9:.2f}) "
            f"| {rf['images_per_s']:,.0f} ({rf['compute_images_per_s']:,.0f}; {rf['hbm_images_per_s']:,.0f}) "
            f"| {_collectives(r)} | {r['compile_seconds']:,.0f} s |")
    if pod:
        m = pod["memory"]["train"]
        lines.append("")
        lines.append(
            f"**Pod scale**: {pod['arch']} on {POD[1]} (`--topology {pod['topology']}`: {pod['devices']} chips, "
            f"{pod['hosts']} hosts as libtpu describes it), global batch {pod['global_batch']:,} "
            f"({pod['per_device_batch']} a chip): the same layout compiles, in {pod['compile_seconds']:,.0f} s "
            f"(train + eval; {pod['wall_seconds']:,.0f} s for the whole child): {m['total'] / 2**30:.2f} GiB"
            f"{_input_mark(pod)} a chip ({m['arguments'] / 2**30:.2f} arguments + {m['temporaries'] / 2**30:.2f} "
            f"temporaries) of {pod['hbm_per_device'] / 2**30:.1f} GiB, {pod['flops_per_image'] / 1e9:.2f} GFLOPs an "
            f"image, {_collectives(pod)} a step, every one over groups of "
            f"{' or '.join(map(str, _groups(pod)))} devices, roofline {pod['roofline']['images_per_s']:,.0f} "
            f"images/s (compute {pod['roofline']['compute_images_per_s']:,.0f}).")
    return "\n".join(lines)


@functools.cache
def batch_dtypes() -> dict[str, str]:
    """The dtypes of the batches a run feeds its steps now (what a row must have been compiled for)."""
    from train.mesh import device_batch
    from train.pipeline import RunData

    return {k: str(v.dtype) for k, v in device_batch(RunData.padding_example(IMAGE_SIZE)).items()}


def _save(path: Path, done: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(done.values()), indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tpu_table", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-results/tpu_table.json"), help="all reports as JSON")
    p.add_argument("--arch", nargs="+", default=list(ARCHS), help="architectures")
    p.add_argument("--slice", nargs="*", default=list(SLICES), choices=list(SLICES),
                   help="single-host slices (none: only the pod-scale compile)")
    p.add_argument("--no-search", action="store_true", help="skip the largest-batch search (one compile each)")
    p.add_argument("--no-pod", action="store_true", help="skip the pod-scale compile")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        result = child(rest[0], rest[1], PER_CHIP) if kind == "report" else search_child(json.loads(rest[0]))
        print(json.dumps(result, default=str))
        return 0
    rows, done = [], {}
    if args.out.exists():  # resume: a long run killed part-way keeps what it finished
        done = {(r["arch"], r["topology"]): r for r in json.loads(args.out.read_text())}
    current = batch_dtypes()
    todo = [(a, n, SLICES[n], not args.no_search) for n in args.slice for a in args.arch]
    if not args.no_pod:
        todo.insert(0, (POD[0], POD[1], POD[2], False))  # the slowest compile first: a cut-short run keeps it
    for arch, name, topology, search in todo:
        r = done.get((arch, topology))
        if r is None or r.get("batch_dtypes") != current:  # new, or compiled for other batches than runs feed
            r = done[(arch, topology)] = run_child("report", arch, topology)
            _save(args.out, done)
        if search and "largest_fitting_batch" not in r:
            r.update(run_child("search", json.dumps(r)))
        _save(args.out, done)
        print(f"{arch} {name}: {r['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
        rows.append((name, r))
    pod = rows.pop(0)[1] if not args.no_pod else None
    print(markdown(rows, pod))
    return 0


if __name__ == "__main__":
    sys.exit(main())
