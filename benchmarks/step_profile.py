"""Where the Flax train step's time goes: its compiled operations by kind, from JAX's profiler.

``python -m benchmarks.step_profile --arch resnet18 --batch 64 --image-size 64`` builds the ``flax-fast`` train
step of ``python -m benchmarks`` (the code ``python -m train`` runs, with its compile options), times it, then
traces ``--steps`` steps with ``jax.profiler`` and sums the time of each operation XLA ran, grouped by kind (the
HLO name without its number: ``transpose_copy_fusion``, ``dot``, ``convolution``...). On a GPU the operations
are the kernels on the device's streams; on a CPU they are the thunks XLA's thread pool ran, so their times add
up over the threads (thread-milliseconds, up to the thread count times the step's wall time). XLA:CPU runs
convolutions and matmuls on Eigen's own tasks, outside their operation's span, so on a CPU most of their time is
in the last row: the threads' time in no operation's span.
Writes ``benchmarks/results/step-profile-TAG.json``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import statistics
import sys
import tempfile
import time
from typing import Any

from benchmarks import results


def profile(run: Any, steps: int) -> tuple[dict[str, float], str, int]:
    """Milliseconds per step of each kind of operation over ``steps`` calls of ``run``; where they ran; and on a
    CPU the number of XLA:CPU threads seen (0 on a GPU)."""
    import jax

    with tempfile.TemporaryDirectory(prefix="step-profile-") as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(steps):
            run()
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    kinds: dict[str, float] = collections.defaultdict(float)
    gpu = jax.default_backend() != "cpu"
    threads = set()
    for plane in data.planes:
        if gpu and (not plane.name.startswith("/device:") or "CUSTOM" in plane.name):
            continue
        streams = any(line.name.startswith("Stream") for line in plane.lines)
        for line in plane.lines:
            if not gpu and "XLAEigen" not in line.name:  # XLA:CPU's thread pool; its thunks are the operations
                continue
            if not gpu:
                threads.add(line.name)
            if gpu and not (line.name.startswith("Stream") or (line.name == "XLA Ops" and not streams)):
                continue  # a GPU's kernels are on its streams (a TPU's ops on "XLA Ops"); other lines repeat them
            for event in line.events:
                if event.name.startswith("ThunkExecutor") or "Await" in event.name:
                    continue
                kinds[re.sub(r"\.\d+$", "", event.name)] += event.duration_ns / 1e6 / steps
    return dict(kinds), "GPU streams (device ms)" if gpu else "XLA:CPU threads (thread-ms)", len(threads)


def rows(kinds: dict[str, float], top: int) -> list[dict[str, Any]]:
    """The ``top`` kinds by time, then the rest as one row; each with its share of the total."""
    total = sum(kinds.values()) or 1.0
    ranked = sorted(kinds.items(), key=lambda kv: -kv[1])
    out = [{"kind": k, "ms_per_step": ms, "share": ms / total} for k, ms in ranked[:top]]
    rest = sum(ms for _, ms in ranked[top:])
    if rest:
        out.append({"kind": f"other ({len(ranked) - top} kinds)", "ms_per_step": rest, "share": rest / total})
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.step_profile``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--steps", type=int, default=5, help="steps timed, then as many profiled (default 5)")
    p.add_argument("--top", type=int, default=12, help="kinds listed before the rest (default 12)")
    results.add_arguments(p)
    args = p.parse_args(argv)

    import jax

    from benchmarks.config import Case, fast_options, resolve_dtype
    from benchmarks.flax_work import build

    dtype = resolve_dtype(args.dtype, jax.default_backend() == "gpu")
    case = Case("flax-fast", "flax", args.arch, "train", args.batch, args.image_size, dtype,
                flax=fast_options("train"))
    work = build(case)
    for _ in range(2):
        work.run()
    seconds = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        work.run()
        seconds.append(time.perf_counter() - t0)
    kinds, where, threads = profile(work.run, args.steps)
    step_ms = statistics.median(seconds) * 1e3
    table = rows(kinds, args.top)
    if threads:  # XLA:CPU runs convolutions and matmuls on Eigen's own tasks, outside their operation's span
        spare = threads * step_ms - sum(kinds.values())
        table.append({"kind": f"in no operation's span ({threads} threads x the step, less the above)",
                      "ms_per_step": spare, "share": None})
    measured = (f"flax-fast train step of {args.arch}, batch {args.batch}, {args.image_size} px, {dtype}: median "
                f"of {args.steps} timed steps {step_ms:.1f} ms; then {args.steps} steps under jax.profiler, each "
                f"operation's time summed by kind over the {where}")
    results.save(args, results.record(
        "step-profile", results.command_line("benchmarks.step_profile", argv if argv is not None else sys.argv[1:]),
        table, settings={"measured": measured, "step_ms": step_ms, "where": where, "steps": args.steps},
        raw={"kinds": kinds, "step_s": seconds}))
    print(f"{args.arch} train step, batch {args.batch}, {args.image_size} px, {dtype}: {step_ms:.1f} ms; "
          f"operations by kind over the {where}:")
    for r in table:
        share = "" if r["share"] is None else f"{100 * r['share']:5.1f} %"
        print(f"  {r['ms_per_step']:9.2f} ms  {share:>7}  {r['kind']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
