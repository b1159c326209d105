"""What the recipe augmentations cost the input pipeline: images/s of ``train.pipeline.RunData`` alone, with and
without them.

``python -m benchmarks.augment_cost`` writes photo-like JPEGs (``benchmarks.pipeline.write_jpegs``), then reads
them as a run does (one RunData for all epochs, uint8 batches, files in memory) in a fresh process per setting,
the settings taking turns (``--rounds``). "steady img/s" is over the epochs after the first; with 0 workers,
"CPU ms/img" is the process's CPU time per image over those epochs (the host time each image costs). Prints a
table and one ``@@bench`` JSON line; writes no result file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.pipeline import REPLY_PREFIX, run_child, write_jpegs

SETTINGS: dict[str, dict[str, Any]] = {  # name -> train.augment.Augment's fields (None: no augmentation)
    "crop+flip": {},
    "ta_wide": {"policy": "ta_wide"},
    "ra (m9)": {"policy": "ra", "ra_magnitude": 9},
    "erase 0.1": {"random_erase": 0.1},
    "ta_wide+erase 0.1": {"policy": "ta_wide", "random_erase": 0.1},
}


def child(name: str, folder: str, workers: int, batch: int, size: int, epochs: int) -> dict[str, Any]:
    """Read ``epochs`` epochs with setting ``name`` in this process: seconds, CPU seconds and images per epoch."""
    from train.augment import Augment
    from train.pipeline import RunData, steps_per_epoch
    from train.schedule import Segment
    from train.sources import FileSource, Splits

    paths = sorted(str(p) for p in Path(folder).glob("*.jpg"))
    source = FileSource(tuple(paths), tuple(i % 10 for i in range(len(paths))))
    augment = Augment(**SETTINGS[name]) if SETTINGS[name] else None
    spe = steps_per_epoch(len(paths), batch)
    run = RunData(Splits(source, FileSource((), ())), [Segment("train", e, 0, spe) for e in range(epochs)],
                  batch_size=batch, image_size=size, seed=0, num_workers=workers, augment=augment)
    wall, cpu, images = [], [], []
    try:
        for epoch in range(epochs):
            t0, c0 = time.perf_counter(), time.process_time()
            images.append(sum(len(b["label"]) for b in run.train(epoch, 0)))
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    finally:
        run.close()
    return {"setting": name, "workers": workers, "epoch_s": wall, "epoch_cpu_s": cpu, "epoch_images": images}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.augment_cost``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, nargs="+", default=[2, 0], help="2: python -m train's default")
    p.add_argument("--epochs", type=int, default=3, help="epochs per child process (the first includes start-up)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        name, folder, *numbers = args.child
        sys.stdout.write(REPLY_PREFIX + json.dumps(child(name, folder, *map(int, numbers))) + "\n")
        return 0
    samples: dict[tuple[str, int], list[dict[str, Any]]] = {(s, w): [] for s in SETTINGS for w in args.workers}
    with tempfile.TemporaryDirectory(prefix="bench-jpegs-") as tmp:
        write_jpegs(Path(tmp), args.images)
        for r in range(args.rounds):
            for w in args.workers:
                for name in SETTINGS:
                    reply = run_child(["--child", name, tmp, str(w), str(args.batch), str(args.image_size),
                                       str(args.epochs)], module="benchmarks.augment_cost")
                    samples[(name, w)].append(reply)
                    print(f"round {r + 1} workers {w} {name}: {reply.get('error') or reply['epoch_s']}",
                          file=sys.stderr, flush=True)
    rows = []
    for (name, w), replies in samples.items():
        ok = [s for s in replies if "error" not in s]
        if not ok:
            rows.append({"setting": name, "workers": w, "error": replies[0]["error"]})
            continue
        rate = statistics.median(sum(s["epoch_images"][1:]) / sum(s["epoch_s"][1:]) for s in ok)
        cpu_ms = statistics.median(1e3 * sum(s["epoch_cpu_s"][1:]) / sum(s["epoch_images"][1:]) for s in ok)
        rows.append({"setting": name, "workers": w, "images_per_s": rate, "cpu_ms_per_image": cpu_ms,
                     "samples": [sum(s["epoch_images"][1:]) / sum(s["epoch_s"][1:]) for s in ok]})
    print(f"{'setting':20s} {'workers':>7s} {'steady img/s':>13s} {'CPU ms/img (0 workers)':>23s}")
    for row in rows:
        cpu = f"{row['cpu_ms_per_image']:.1f}" if row["workers"] == 0 and "error" not in row else "-"
        rate = f"{row['images_per_s']:.0f}" if "error" not in row else row["error"]
        print(f"{row['setting']:20s} {row['workers']:7d} {rate:>13s} {cpu:>23s}")
    sys.stdout.write(REPLY_PREFIX + json.dumps({"rows": rows, "args": vars(args)}) + "\n")
    return 0


if __name__ == "__main__":  # grain's worker processes re-import the main module: keep the entry guarded
    sys.exit(main())
