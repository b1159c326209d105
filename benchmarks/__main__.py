"""``python -m benchmarks``: Flax vs PyTorch images/s, compile time and peak memory, side by side.

Examples::

    python -m benchmarks --sweep                      # docs/performance.md's table: 32/64/112/224 px, about 15 minutes
    python -m benchmarks --quick                      # batch 8 at 224 px, about 5 minutes on 2 CPU cores
    python -m benchmarks --arch resnet50 --batch 16 32 --mode train --steps 7
    python -m benchmarks --levers --arch resnet18     # each Flax lever on its own, as ratios
    python -m benchmarks --torch-compile              # add a torch.compile (inductor) column
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import results
from benchmarks.config import (
    FLAX_PLAIN,
    LEVERS,
    Case,
    conv_lever_applies,
    fast_options,
    resolve_dtype,
    without_conv_lever,
)
from benchmarks.harness import ROOT, Result, Timing, last_line, measure
from benchmarks.report import (
    comparison_rows,
    converter_line,
    end_to_end_rows,
    lever_rows,
    markdown,
    pipeline_rows,
    write_json,
)
from benchmarks.worker import REPLY_PREFIX

MODES = ("infer", "train")
FULL_BATCHES = {"infer": (8, 32), "train": (8, 16)}
QUICK_BATCHES = {("resnet18", "infer"): (8,), ("resnet18", "train"): (8,),
                 ("resnet50", "infer"): (8,), ("resnet50", "train"): (8,)}
# --sweep: (image size, batch) of the targets: small images at batch 64, ImageNet size at batch 16.
SWEEP = ((32, 64), (64, 64), (112, 64), (224, 16))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="Flax vs PyTorch ResNet speed.")
    p.add_argument("--arch", nargs="+", default=["resnet18", "resnet50"], help="torchvision architecture names")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: per arch and mode, see --quick)")
    p.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype of both frameworks (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--steps", type=int, help="timed calls per implementation (median reported; default 5, quick 3)")
    p.add_argument("--steps-per-call", type=int, default=1, metavar="K",
                   help="training: K steps dispatched back to back in each timed call, one wait at the end, as a "
                        "training loop runs them (default 1: each step waited for)")
    p.add_argument("--image-size", type=int, nargs="+", default=[224])
    p.add_argument("--quick", action="store_true", help="one batch size per row, 3 timed calls, no plain-Flax column")
    p.add_argument("--sweep", action="store_true",
                   help="batch 64 at 32, 64 and 112 px and batch 16 at 224 px, 3 timed calls, with --conv-lever, "
                        "no plain-Flax column (overrides --batch and --image-size)")
    p.add_argument("--conv-lever", action="store_true",
                   help="add a flax-fast column with every convolution left to XLA (resnet_flax.conv's choice "
                        "off), where the choice changes anything")
    p.add_argument("--torch-compile", action="store_true", help="also measure torch.compile (slow to compile)")
    p.add_argument("--no-plain", action="store_true", help="skip the plain-Flax column (only flax-fast)")
    p.add_argument("--levers", nargs="*", metavar="NAME", choices=list(LEVERS),
                   help=f"measure Flax levers (all, or those named: {', '.join(LEVERS)}) instead of the main table")
    p.add_argument("--skip", nargs="*", default=[], choices=["models", "pipeline", "converter", "end-to-end"])
    p.add_argument("--e2e-epochs", type=int, default=20,
                   help="epochs of the end-to-end digits run (python -m train vs a plain PyTorch script)")
    p.add_argument("--max-foreign", type=float, default=0.15,
                   help="retry samples during which other processes used more than this share of the CPUs")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each timed call wait up to S seconds for other processes to leave the CPUs idle")
    p.add_argument("--cold-calls", action="store_true",
                   help="time each call after the idle gap between samples, without the untimed call before it")
    p.add_argument("--out", type=Path, default=Path("bench-results/benchmark.json"),
                   help="everything measured, with every sample (the result files keep the tables' rows)")
    results.add_arguments(p)
    return p.parse_args(argv)


def log(message: str) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def has_gpu() -> bool:
    """Whether an NVIDIA GPU is visible (decided without importing either framework into this process)."""
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def batches_for(args: argparse.Namespace, arch: str, mode: str) -> tuple[int, ...]:
    """Batch sizes of one (arch, mode) row group."""
    if args.batch:
        return tuple(args.batch)
    if args.quick:
        return QUICK_BATCHES.get((arch, mode), (8,))
    return FULL_BATCHES[mode]


def workloads(args: argparse.Namespace, arch: str, mode: str) -> list[tuple[int, int]]:
    """(image size, batch) of each row of one (arch, mode)."""
    if args.sweep:
        return list(SWEEP)
    return [(size, batch) for size in args.image_size for batch in batches_for(args, arch, mode)]


def workload(args: argparse.Namespace, arch: str, mode: str, batch: int, dtype: str, image_size: int
             ) -> dict[str, Any]:
    """The fields every implementation of one workload shares (a Case's keyword arguments)."""
    return {"arch": arch, "mode": mode, "batch": batch, "image_size": image_size, "dtype": dtype,
            "steps_per_call": args.steps_per_call if mode == "train" else 1}


def comparison_cases(args: argparse.Namespace, arch: str, mode: str, batch: int, dtype: str,
                     image_size: int = 224) -> list[Case]:
    """The implementations of one workload in the main table, in timing order."""
    common = workload(args, arch, mode, batch, dtype, image_size)
    cases = [Case("torch", "torch", **common)]
    if not (args.no_plain or args.quick or args.sweep):
        cases.append(Case("flax", "flax", flax=FLAX_PLAIN, **common))
    cases.append(Case("flax-fast", "flax", flax=fast_options(mode), **common))
    if (args.conv_lever or args.sweep) and conv_lever_applies(image_size):
        cases.append(Case("flax-fast-xlaconv", "flax", flax=without_conv_lever(fast_options(mode)), **common))
    if args.torch_compile:
        cases.append(Case("torch.compile", "torch", torch_compile=True, **common))
    return cases


def lever_cases(args: argparse.Namespace, arch: str, mode: str, batch: int, dtype: str,
                image_size: int = 224) -> list[Case]:
    """PyTorch plus every Flax lever that applies to ``mode``."""
    common = workload(args, arch, mode, batch, dtype, image_size)
    cases = [Case("torch", "torch", **common)]
    wanted = set(args.levers or LEVERS) | {"plain"}
    cases += [Case(name, "flax", flax=opts, **common) for name, (modes, opts) in LEVERS.items()
              if mode in modes and name in wanted]
    return cases


def run_models(args: argparse.Namespace, dtype: str, timing: Timing,
               make_cases: Callable[..., list[Case]]) -> list[list[Result]]:
    """Measure every (arch, mode, batch) group; each group's implementations alternate."""
    groups = []
    for arch in args.arch:
        for mode in args.mode:
            for size, batch in workloads(args, arch, mode):
                log(f"{arch} {mode} {size} px batch {batch}:")
                t0 = time.perf_counter()
                groups.append(measure(make_cases(args, arch, mode, batch, dtype, size), timing, log))
                summary = ", ".join(f"{r.case.impl} {r.images_per_s:.1f}" if r.ok and r.images_per_s else
                                    f"{r.case.impl} n/a" for r in groups[-1])
                log(f"  img/s: {summary}  ({time.perf_counter() - t0:.0f} s)")
    return groups


def run_child(module: str, args: list[str]) -> dict[str, Any]:
    """Run ``python -m module`` and return its ``@@bench`` JSON report (or an error record)."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(REPLY_PREFIX):
            return json.loads(line[len(REPLY_PREFIX):])
    return {"error": f"{module} failed (rc={proc.returncode}): {last_line(proc.stderr)}"}


def environment(gpu: bool, dtype: str) -> dict[str, Any]:
    """Versions and machine facts recorded with the results."""
    return {"python": platform.python_version(), "machine": platform.machine(), "cpu": results.cpu_model(),
            "isa": results.cpu_flags(), "cpu_count": os.cpu_count(), "gpu": gpu, "dtype": dtype,
            "versions": results.versions(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "loadavg_start": _loadavg()}


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def save_child(args: argparse.Namespace, kind: str, module: str, child_args: list[str],
               report: dict[str, Any]) -> None:
    """The result file of a child benchmark (pipeline, end to end, converter) run from here."""
    rows = {"pipeline": results.pipeline_rows, "end-to-end": results.end_to_end_rows,
            "converter": results.converter_rows}[kind](report)
    results.save(args, results.record(kind, results.command_line(module, child_args), rows, raw=report))


def print_models(groups: list[list[Result]], levers: bool, with_compile: bool) -> dict[str, Any]:
    """Print the model table; return it as markdown and as rows of {column: cell} for the JSON."""
    header, rows = lever_rows(groups) if levers else comparison_rows(groups, with_compile)
    table = markdown(header, rows)
    print(table)
    failures = [f"{r.case.impl} {r.case.arch} {r.case.mode} b{r.case.batch}: {r.error}"
                for g in groups for r in g if not r.ok]
    for line in failures:
        print(f"n/a: {line}")
    name = "levers" if levers else "models"
    return {name: table, f"{name}_rows": [dict(zip(header, row)) for row in rows]}


def settings(args: argparse.Namespace, dtype: str, timing: Timing) -> dict[str, Any]:
    """How the model tables were measured, for the result files."""
    return {"dtype": dtype, "timed_calls": timing.steps, "max_foreign": timing.max_foreign,
            "wait_quiet_s": timing.wait_quiet_s, "warm_call": timing.warm_call,
            "measured": f"{dtype}, median of {timing.steps} timed calls after a warm-up, implementations "
                        "alternating, each in its own process"
                        + ("; each timed call right after an untimed one" if timing.warm_call else "")
                        + (f"; each training call {args.steps_per_call} steps dispatched back to back, one wait"
                           if args.steps_per_call > 1 else "")}


def main(argv: Sequence[str] | None = None) -> int:
    """Run what was asked, print the tables, write the JSON and the result files."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    gpu = has_gpu()
    dtype = resolve_dtype(args.dtype, gpu)
    timing = Timing(steps=args.steps or (3 if args.quick or args.sweep else 5), max_foreign=args.max_foreign,
                    wait_quiet_s=args.wait_quiet, warm_call=not args.cold_calls)
    payload: dict[str, Any] = {"environment": environment(gpu, dtype), "timing": vars(timing),
                               "argv": list(argv if argv is not None else sys.argv[1:])}
    started = time.perf_counter()
    tables: dict[str, Any] = {}
    if "models" not in args.skip:
        groups = run_models(args, dtype, timing, lever_cases if args.levers is not None else comparison_cases)
        payload["results"] = [r.to_dict() for g in groups for r in g]
        tables.update(print_models(groups, args.levers is not None, args.torch_compile))
        kind = "levers" if args.levers is not None else "sweep" if args.sweep else "models"
        rows = results.lever_rows(groups) if kind == "levers" else results.model_rows(groups)
        results.save(args, results.record(kind, results.command_line("benchmarks", argv), rows,
                                          settings=settings(args, dtype, timing),
                                          raw={"results": payload["results"]}))
    if "pipeline" not in args.skip and args.levers is None:
        log("input pipeline vs torchvision's DataLoader (decode + augment JPEGs):")
        payload["pipeline"] = run_child("benchmarks.pipeline", ["--no-results"])
        if "error" in payload["pipeline"]:
            print(f"input pipeline: n/a ({payload['pipeline']['error']})")
        else:
            save_child(args, "pipeline", "benchmarks.pipeline", [], payload["pipeline"])
            tables["pipeline"] = markdown(*pipeline_rows(payload["pipeline"]))
            print(f"\ninput pipeline ({payload['pipeline']['images']} JPEGs of 320-500 px -> RandomResizedCrop "
                  f"{payload['pipeline']['image_size']} + flip + normalise, batch {payload['pipeline']['batch_size']}, "
                  f"steady img/s):\n{tables['pipeline']}")
    if "end-to-end" not in args.skip and args.levers is None:
        log(f"end to end: resnet18 on digits, {args.e2e_epochs} epochs, plain PyTorch script vs python -m train:")
        e2e_args = ["--epochs", str(args.e2e_epochs)]
        payload["end_to_end"] = run_child("benchmarks.end_to_end", [*e2e_args, "--no-results"])
        if "error" in payload["end_to_end"]:
            print(f"end to end: n/a ({payload['end_to_end']['error']})")
        else:
            save_child(args, "end-to-end", "benchmarks.end_to_end", e2e_args, payload["end_to_end"])
            tables["end_to_end"] = markdown(*end_to_end_rows(payload["end_to_end"]))
            print(f"\nend to end (resnet18, sklearn digits at 32 px, {args.e2e_epochs} epochs, batch 64, SGD):\n"
                  f"{tables['end_to_end']}")
    if "converter" not in args.skip and args.levers is None:
        log("converter (wide_resnet101_2):")
        payload["converter"] = run_child("benchmarks.converter", ["--no-results"])
        print("\n" + converter_line(payload["converter"]))
        if "error" not in payload["converter"]:
            save_child(args, "converter", "benchmarks.converter", [], payload["converter"])
    payload["tables"] = tables
    payload["environment"]["loadavg_end"] = _loadavg()
    payload["wall_s"] = time.perf_counter() - started
    log(f"wrote {write_json(args.out, payload)} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
