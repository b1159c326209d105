"""Input pipeline against torchvision's DataLoader: decode + RandomResizedCrop + flip + normalise of real JPEGs.

``python -m benchmarks.pipeline`` writes photo-like JPEGs of 320-500 px into a temporary folder, then reads
them for several epochs, batch 32, with each implementation in a fresh process, the implementations taking
turns (round-robin, ``--rounds`` times) at each worker count:

- ``grain``: ``train.pipeline.RunData``, as ``python -m train`` reads a run: one grain iterator for all epochs
  (workers start once), uint8 batches (the jitted step normalises on the device), files held in memory.
- ``grain-per-epoch``: the earlier form, ``make_loader`` per epoch with float32 host normalisation (workers
  started again every epoch, files read from disk): what the levers above replaced.
- ``torch``: ``torch.utils.data.DataLoader`` over ``RandomResizedCrop``, ``RandomHorizontalFlip``,
  ``ToTensor``, ``Normalize`` on PIL images, ``shuffle=True``, ``drop_last=True``, and
  ``persistent_workers=True`` (its best ordinary setting) when it has workers.

"steady img/s" is over the epochs after the first; "1st epoch s" includes starting the workers. Prints one
``@@bench`` JSON line, which ``python -m benchmarks`` collects. The child processes import neither jax nor
resnet_flax (spawned grain workers re-import this module).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks import results

REPLY_PREFIX = "@@bench "  # as benchmarks.worker's, not imported: that module imports jax
IMPLS = ("grain", "grain-per-epoch", "torch")
ROOT = Path(__file__).resolve().parent.parent


def write_jpegs(folder: Path, count: int, seed: int = 0, sizes: tuple[int, int] = (320, 500)) -> list[str]:
    """``count`` photo-like JPEGs, each side drawn from ``sizes`` (smooth colour fields, edges and grain)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
        coarse = rng.integers(0, 256, size=(max(height // 25, 2), max(width // 25, 2), 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
        pixels = smooth + rng.integers(-12, 13, size=smooth.shape, dtype=np.int16)
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def grain_epochs(paths: list[str], workers: int, batch: int, size: int, epochs: int, per_epoch: bool):
    """Batches of ``epochs`` epochs through train.pipeline: one RunData, or make_loader (float32) per epoch."""
    from train.pipeline import RunData, make_loader, steps_per_epoch
    from train.schedule import Segment
    from train.sources import FileSource, Splits

    source = FileSource(tuple(paths), tuple(i % 10 for i in range(len(paths))))
    if per_epoch:
        for epoch in range(epochs):
            yield make_loader(source, batch_size=batch, image_size=size, train=True, seed=0, epoch=epoch,
                              num_workers=workers)
        return
    spe = steps_per_epoch(len(paths), batch)
    schedule = [Segment("train", e, 0, spe) for e in range(epochs)]
    run = RunData(Splits(source, FileSource((), ())), schedule, batch_size=batch, image_size=size, seed=0,
                  num_workers=workers)
    try:
        for epoch in range(epochs):
            yield run.train(epoch, 0)
    finally:
        run.close()


def torch_epochs(paths: list[str], workers: int, batch: int, size: int, epochs: int):
    """Batches of ``epochs`` epochs through a torchvision DataLoader."""
    import torch
    from torchvision import transforms as T

    from train.transforms import IMAGENET_MEAN, IMAGENET_STD

    transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = torch.utils.data.DataLoader(JpegFiles(paths, transform), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    for _ in range(epochs):
        yield ((x, y) for x, y in loader)


class JpegFiles:
    """A map-style torch dataset of (image, label) as a user writes it (PIL open, RGB, transform)."""

    def __init__(self, paths: list[str], transform: Any):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), i % 10


def child(impl: str, folder: str, workers: int, batch: int, size: int, epochs: int) -> dict[str, Any]:
    """Time ``epochs`` epochs of ``impl`` in this process; seconds and images of each epoch."""
    paths = sorted(str(p) for p in Path(folder).glob("*.jpg"))
    t0 = time.perf_counter()
    if impl == "torch":
        loaders = torch_epochs(paths, workers, batch, size, epochs)
    else:
        loaders = grain_epochs(paths, workers, batch, size, epochs, per_epoch=impl == "grain-per-epoch")
    times, images = [], []
    start = t0
    for loader in loaders:
        n = 0
        for b in loader:
            n += len(b[1] if impl == "torch" else b["label"])
        now = time.perf_counter()
        times.append(now - start)
        images.append(n)
        start = now
    return {"impl": impl, "workers": workers, "epoch_s": times, "epoch_images": images,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def run_child(args: list[str], module: str = "benchmarks.pipeline") -> dict[str, Any]:
    """One ``--child`` process of ``module`` (niced like the caller); its JSON reply or an error record."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(REPLY_PREFIX):
            return json.loads(line[len(REPLY_PREFIX):])
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return {"error": f"rc={proc.returncode}: {tail[-1][:300] if tail else ''}"}


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Median steady img/s (epochs after the first) and median first-epoch seconds over the rounds."""
    ok = [s for s in samples if "error" not in s]
    if not ok:
        return {"error": samples[0]["error"] if samples else "no samples"}
    steady = [sum(s["epoch_images"][1:]) / sum(s["epoch_s"][1:]) for s in ok]
    return {"steady_images_per_s": statistics.median(steady), "steady_samples": steady,
            "first_epoch_s": statistics.median(s["epoch_s"][0] for s in ok),
            "peak_rss_mb": max(s["peak_rss_mb"] for s in ok)}


def run(count: int, batch: int, size: int, workers: list[int], epochs: int, rounds: int,
        impls: tuple[str, ...] = IMPLS, log: Any = None) -> dict[str, Any]:
    """Write the JPEGs, then take turns: for each round, worker count and implementation, one child process."""
    with tempfile.TemporaryDirectory(prefix="bench-jpegs-") as tmp:
        paths = write_jpegs(Path(tmp), count)
        mean_kb = float(np.mean([Path(p).stat().st_size for p in paths]) / 1024)
        samples: dict[tuple[str, int], list[dict[str, Any]]] = {(i, w): [] for i in impls for w in workers}
        for r in range(rounds):
            for w in workers:
                for impl in impls:
                    reply = run_child(["--child", impl, tmp, str(w), str(batch), str(size), str(epochs)])
                    samples[(impl, w)].append(reply)
                    if log:
                        log(f"  round {r + 1} workers {w} {impl}: " + (reply.get("error") or " ".join(
                            f"{n / s:.0f}" for n, s in zip(reply["epoch_images"], reply["epoch_s"])) + " img/s"))
    rows = []
    for w in workers:
        row = {"num_workers": w, **{impl: summarise(samples[(impl, w)]) for impl in impls}}
        rows.append(row)
    return {"images": count, "jpeg_sizes": "320-500 px", "mean_jpeg_kb": mean_kb, "batch_size": batch,
            "image_size": size, "epochs": epochs, "rounds": rounds, "rows": rows,
            "samples": {f"{i}/{w}": s for (i, w), s in samples.items()}}


def settings(report: dict[str, Any]) -> dict[str, Any]:
    """How the table was measured, in words (for the result file)."""
    return {"measured": f"{report['images']} photo-like JPEGs of {report['jpeg_sizes']}, RandomResizedCrop "
                        f"{report['image_size']} + flip + normalise, batch {report['batch_size']}, {report['epochs']} "
                        f"epochs per fresh process, steady img/s over the epochs after the first, median of "
                        f"{report['rounds']} round(s), loaders taking turns"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.pipeline``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, nargs="+", default=[2, 0])
    p.add_argument("--epochs", type=int, default=3, help="epochs per child process (the first includes start-up)")
    p.add_argument("--rounds", type=int, default=2, help="turns each implementation takes at each worker count")
    p.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    results.add_arguments(p)
    p.add_argument("--child", nargs=6, metavar=("IMPL", "DIR", "WORKERS", "BATCH", "SIZE", "EPOCHS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        impl, folder, *numbers = args.child
        report = child(impl, folder, *map(int, numbers))
    else:
        report = run(args.images, args.batch, args.image_size, args.workers, args.epochs, args.rounds,
                     tuple(args.impl), log=lambda m: print(m, file=sys.stderr, flush=True))
        results.save(args, results.record("pipeline", results.command_line("benchmarks.pipeline", argv or sys.argv[1:]),
                                          results.pipeline_rows(report), settings=settings(report), raw=report))
    sys.stdout.write(REPLY_PREFIX + json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":  # grain's worker processes re-import the main module: keep the entry guarded
    sys.exit(main())
