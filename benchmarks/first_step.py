"""Time to the first step: ``python -m train`` from its start to its first finished step, cold and warm.

``python -m benchmarks.first_step`` runs ``python -m train --arch resnet18 --dataset synthetic --image-size 32
--batch-size 64 --max-steps 3 --log-every 1`` in fresh workdirs, timing each from the command's start to the first
line of its ``metrics.jsonl`` (written when the first step has finished): with an empty compilation cache
(``--cold`` runs, each in a new ``$RESNET_FLAX_HOME``) and with the cache the first of them filled (``--warm`` runs),
with two loader worker processes and with none (threads), taking turns. Writes
``benchmarks/results/first-step-TAG.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import results

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--arch", "resnet18", "--dataset", "synthetic", "--image-size", "32", "--batch-size", "64",
        "--max-steps", "3", "--log-every", "1", "--no-progress"]


def first_step_seconds(workdir: Path, home: Path, workers: int, timeout: float = 600) -> float:
    """Seconds from starting ``python -m train`` to its first metrics line; the run is then left to finish."""
    env = {**os.environ, "RESNET_FLAX_HOME": str(home)}
    metrics = workdir / "metrics.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "train", *ARGS, "--num-workers", str(workers),
                             "--workdir", str(workdir)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while not (metrics.exists() and metrics.read_text().strip()):
        if proc.poll() is not None:
            raise RuntimeError(f"python -m train exited {proc.returncode}: {proc.stderr.read()[-500:]}")
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise RuntimeError(f"no step finished in {timeout:.0f} s")
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"python -m train exited {proc.returncode}: {err[-500:]}")
    return seconds


def run(cold: int, warm: int, workers: tuple[int, ...], log: Any = print) -> dict[str, Any]:
    """``cold`` runs with the first worker count, each with an empty cache, then ``warm`` rounds of each worker count
    on the cache the first cold run filled; (cache, workers) -> seconds of each run."""
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-first-step-") as tmp:
        base = Path(tmp)
        for i in range(cold):
            s = first_step_seconds(base / f"cold{i}", base / ("home" if i == 0 else f"home{i}"), workers[0])
            samples.setdefault(f"cold/{workers[0]}", []).append(s)
            log(f"  cold cache, {workers[0]} workers: {s:.2f} s")
        if not cold:
            first_step_seconds(base / "fill", base / "home", workers[0])
        for r in range(warm):
            for w in workers:
                s = first_step_seconds(base / f"warm{r}-{w}", base / "home", w)
                samples.setdefault(f"warm/{w}", []).append(s)
                log(f"  warm cache, {w} workers: {s:.2f} s")
    return {"command": " ".join(["python", "-m", "train", *ARGS]), "samples": samples}


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (cache, workers): every run's seconds and their median."""
    out = []
    for key, seconds in report["samples"].items():
        cache, workers = key.split("/")
        out.append({"cache": cache, "workers": int(workers), "seconds": seconds,
                    "median_s": statistics.median(seconds)})
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.first_step``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cold", type=int, default=2, help="runs with an empty compilation cache (default 2)")
    p.add_argument("--warm", type=int, default=3, help="rounds on a warm cache, each worker count once (default 3)")
    p.add_argument("--workers", type=int, nargs="+", default=[2, 0], help="loader worker counts (default: 2 0)")
    results.add_arguments(p)
    args = p.parse_args(argv)
    report = run(args.cold, args.warm, tuple(args.workers), log=lambda m: print(m, file=sys.stderr, flush=True))
    measured = (f"from the start of `{report['command']}` to the first line of its metrics.jsonl (the first "
                f"finished step); cold: an empty $RESNET_FLAX_HOME each run; warm: the cache the first cold run "
                f"filled; runs taking turns")
    results.save(args, results.record("first-step", results.command_line("benchmarks.first_step",
                                                                          argv if argv is not None else sys.argv[1:]),
                                      rows(report), settings={"measured": measured}, raw=report))
    for r in rows(report):
        print(f"{r['cache']} cache, {r['workers']} workers: median {r['median_s']:.2f} s "
              f"({', '.join(f'{s:.2f}' for s in r['seconds'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
