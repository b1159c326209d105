"""Input pipeline on its own: decode + augment real JPEGs through ``train.data.make_loader``.

``python -m benchmarks.pipeline`` writes JPEGs into a temporary folder, then reads them as a training epoch
(RandomResizedCrop, flip, normalise) with 0, 1 and 2 worker processes and reports images/s in total and per
worker process (``num_workers=0`` decodes on threads of the main process; it counts as one). It prints one
``@@bench`` JSON line, which ``python -m benchmarks`` collects.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.worker import REPLY_PREFIX, peak_rss_mb


def write_jpegs(folder: Path, count: int, width: int = 500, height: int = 375, seed: int = 0) -> list[str]:
    """``count`` photo-like JPEGs (smooth colour fields plus grain; ImageNet's typical 500x375) in ``folder``."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, size=(height // 25, width // 25, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
        pixels = smooth + rng.integers(-12, 13, size=smooth.shape, dtype=np.int16)
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def time_epoch(paths: list[str], num_workers: int, batch_size: int, image_size: int) -> dict[str, Any]:
    """One training epoch through ``make_loader``: images/s over the whole epoch, start-up included, and after
    the first batch (steady state, though prefetched batches flatter it a little)."""
    from train.data import FileSource, make_loader

    source = FileSource(tuple(paths), tuple(i % 10 for i in range(len(paths))))
    t0 = time.perf_counter()
    loader = make_loader(source, batch_size=batch_size, image_size=image_size, train=True, seed=0,
                         num_workers=num_workers)
    first = next(loader)
    t_first = time.perf_counter()
    images = len(first["label"])
    for batch in loader:
        images += len(batch["label"])
    t_end = time.perf_counter()
    if first["image"].shape != (batch_size, image_size, image_size, 3):
        raise RuntimeError(f"unexpected batch shape {first['image'].shape}")
    rate = images / (t_end - t0)
    processes = max(num_workers, 1)
    return {"num_workers": num_workers, "images_per_s": rate, "images_per_s_per_process": rate / processes,
            "steady_images_per_s": (images - len(first["label"])) / max(t_end - t_first, 1e-9),
            "first_batch_s": t_first - t0, "images": images}


def run(count: int, batch_size: int, image_size: int, workers: list[int]) -> dict[str, Any]:
    """Write the JPEGs, time each worker count, and report."""
    with tempfile.TemporaryDirectory(prefix="bench-jpegs-") as tmp:
        t0 = time.perf_counter()
        paths = write_jpegs(Path(tmp), count)
        write_s = time.perf_counter() - t0
        mean_kb = float(np.mean([Path(p).stat().st_size for p in paths]) / 1024)
        rows = [time_epoch(paths, w, batch_size, image_size) for w in workers]
    return {"images": count, "jpeg_size": "500x375", "mean_jpeg_kb": mean_kb, "write_s": write_s,
            "batch_size": batch_size, "image_size": image_size, "rows": rows, "peak_rss_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.pipeline``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    report = run(args.images, args.batch, args.image_size, args.workers)
    sys.stdout.write(REPLY_PREFIX + json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":  # grain's worker processes re-import the main module: keep the entry guarded
    sys.exit(main())
