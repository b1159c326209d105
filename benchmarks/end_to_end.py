"""End to end: ``python -m train`` against a plain PyTorch script, same data, model and recipe, wall time.

``python -m benchmarks.end_to_end`` writes scikit-learn's digits (1,797 8x8 images, upscaled to 32 px) as a
PNG folder with train/ and val/ class folders (stratified 80/20, seeded), then runs, taking turns
(``--rounds``), ``benchmarks/digits_torch.py`` in three forms (DataLoader workers; decoded images in memory,
one process; the same saving a checkpoint every epoch, as ``python -m train`` does) and
``python -m train --arch resnet18`` with the same recipe:
batch 64, SGD (Nesterov momentum 0.9, lr 0.1, 20 warm-up steps then cosine, weight decay 5e-4 on kernels),
no label smoothing, RandomResizedCrop + flip, 2 loader workers, evaluated every epoch. Each command's wall
time is measured from its start to its exit (start-up, compilation, checkpoints and evaluations included);
the final validation top-1 of each is read from its output. The fastest PyTorch script is the baseline.
Needs ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import json
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

REPLY_PREFIX = "@@bench "
ROOT = Path(__file__).resolve().parent.parent
RECIPE = {"batch_size": 64, "lr": 0.1, "weight_decay": 5e-4, "warmup_steps": 20, "image_size": 32}


def write_digits(root: Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> tuple[int, int]:
    """scikit-learn's digits as ``root/{train,val}/<digit>/<n>.png`` (8-bit grey, ``size`` px); (train, val)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = [0, 0]
    for label in range(10):
        index = np.flatnonzero(digits.target == label)
        order = rng.permutation(index)
        n_val = round(len(index) * val_fraction)
        for k, i in enumerate(order):
            split = "val" if k < n_val else "train"
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
            Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).save(folder / f"{i}.png")
            counts[split == "val"] += 1
    return counts[0], counts[1]


DATALOADER_WORKERS = 2  # the DataLoader script's workers unless --num-workers says otherwise


def workers_text(workers: int | None) -> str:
    """How many loader workers each command used, for the result's settings."""
    if workers is not None:
        return f"{workers} loader workers (none for the in-memory script)"
    return (f"{DATALOADER_WORKERS} DataLoader workers, python -m train's default loader (threads in its own process "
            "on 2 CPUs or fewer), none for the in-memory script")


def torch_command(data: Path, epochs: int, workers: int | None, in_memory: bool = False,
                  checkpoint_dir: Path | None = None) -> list[str]:
    """The plain PyTorch script's command line: DataLoader workers (default 2), or (``in_memory``) none; with
    ``checkpoint_dir``, saving a checkpoint every epoch."""
    r = RECIPE
    return [sys.executable, str(ROOT / "benchmarks" / "digits_torch.py"), str(data), "--epochs", str(epochs),
            "--batch-size", str(r["batch_size"]), "--image-size", str(r["image_size"]), "--lr", str(r["lr"]),
            "--weight-decay", str(r["weight_decay"]), "--warmup-steps", str(r["warmup_steps"]),
            *(["--in-memory"] if in_memory
              else ["--num-workers", str(DATALOADER_WORKERS if workers is None else workers)]),
            *(["--checkpoint-dir", str(checkpoint_dir)] if checkpoint_dir else [])]


def torch_impl_command(impl: str, data: Path, epochs: int, workers: int | None, checkpoint_dir: Path
                       ) -> list[str]:
    """The command of one of :data:`benchmarks.results.E2E_TORCH_IMPLS`."""
    return torch_command(data, epochs, workers, in_memory=impl != "torch",
                         checkpoint_dir=checkpoint_dir if impl == "torch-in-memory-checkpoints" else None)


def train_command(data: Path, epochs: int, workers: int | None, workdir: Path) -> list[str]:
    """``python -m train`` with the same recipe; its own loader default unless ``workers`` is given."""
    r = RECIPE
    return [sys.executable, "-m", "train", "--arch", "resnet18", "--data-dir", str(data), "--epochs", str(epochs),
            "--batch-size", str(r["batch_size"]), "--image-size", str(r["image_size"]), "--optimizer", "sgd",
            "--lr", str(r["lr"]), "--lr-scaling", "none", "--weight-decay", str(r["weight_decay"]),
            "--warmup-steps", str(r["warmup_steps"]), "--label-smoothing", "0",
            *([] if workers is None else ["--num-workers", str(workers)]), "--no-progress", "--workdir", str(workdir)]


def timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``command`` from the repository root; (wall seconds, the finished process)."""
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    return time.perf_counter() - t0, proc


def torch_result(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    """Final val top-1 from the script's last JSON line."""
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": f"rc={proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:300]}"}
    return json.loads(lines[-1])


def train_result(proc: subprocess.CompletedProcess, workdir: Path) -> dict[str, Any]:
    """Final val top-1 (the last evaluation in metrics.jsonl) and the median logged images/s."""
    if proc.returncode:
        return {"error": f"rc={proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:300]}"}
    records = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evals = [r for r in records if "val_top1" in r]
    ips = [r["images_per_sec"] for r in records if "images_per_sec" in r]
    return {"val_top1": evals[-1]["val_top1"], "median_logged_images_per_s": statistics.median(ips) if ips else None}


def run(epochs: int, rounds: int, workers: int | None, log: Any = None) -> dict[str, Any]:
    """Write the digits, then take turns with the four commands ``rounds`` times."""
    samples: dict[str, list[dict[str, Any]]] = {impl: [] for impl in results.E2E_IMPLS}
    with tempfile.TemporaryDirectory(prefix="bench-digits-") as tmp:
        data = Path(tmp) / "digits"
        n_train, n_val = write_digits(data)
        for r in range(rounds):
            for impl in results.E2E_TORCH_IMPLS:
                wall, proc = timed(torch_impl_command(impl, data, epochs, workers, Path(tmp) / f"checkpoints{r}"))
                samples[impl].append({"wall_s": wall, **torch_result(proc)})
            workdir = Path(tmp) / f"workdir{r}"
            wall, proc = timed(train_command(data, epochs, workers, workdir))
            samples["flax"].append({"wall_s": wall, **train_result(proc, workdir)})
            if log:
                log(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1].get('wall_s'):.0f} s top-1 {v[-1].get('val_top1')}"
                                                   + (f" ({v[-1]['error']})" if "error" in v[-1] else "")
                                                   for k, v in samples.items()))
    summary = {}
    for impl, runs in samples.items():
        ok = [s for s in runs if "error" not in s]
        summary[impl] = ({"wall_s": statistics.median(s["wall_s"] for s in ok),
                          "val_top1": statistics.median(s["val_top1"] for s in ok)} if ok
                         else {"error": runs[0]["error"]})
    return {"dataset": "sklearn digits, 32 px PNG", "train_images": n_train, "val_images": n_val, "epochs": epochs,
            "rounds": rounds, "num_workers": workers, "recipe": RECIPE, "summary": summary, "samples": samples,
            "commands": {**{impl: " ".join(torch_impl_command(impl, Path("DIGITS"), epochs, workers,
                                                               Path("CHECKPOINTS"))[1:])
                            for impl in results.E2E_TORCH_IMPLS},
                         "flax": " ".join(train_command(Path("DIGITS"), epochs, workers, Path("WORKDIR"))[1:])}}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.end_to_end``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=None,
                   help=f"loader workers of the DataLoader script and python -m train (default: "
                        f"{DATALOADER_WORKERS} for the script, python -m train's own default)")
    results.add_arguments(p)
    args = p.parse_args(argv)
    report = run(args.epochs, args.rounds, args.num_workers, log=lambda m: print(m, file=sys.stderr, flush=True))
    measured = (f"resnet18 on scikit-learn's digits as {report['train_images']} + {report['val_images']} PNGs at "
                f"{RECIPE['image_size']} px, {args.epochs} epochs, batch {RECIPE['batch_size']}, SGD, "
                f"{workers_text(args.num_workers)}, evaluated every epoch, python -m train and the third script "
                f"saving a checkpoint every epoch (the other scripts save nothing); wall time of each whole command, "
                f"against the fastest PyTorch script, median of {args.rounds} round(s), taking turns")
    results.save(args, results.record("end-to-end", results.command_line("benchmarks.end_to_end", argv or sys.argv[1:]),
                                      results.end_to_end_rows(report), settings={"measured": measured}, raw=report))
    sys.stdout.write(REPLY_PREFIX + json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
