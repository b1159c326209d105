"""The largest global batch that fits a chip's HBM, found by compiling the train step a few times."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from train.tpu_sizing.compile import OutOfMemory, compile_steps
from train.tpu_sizing.report import fixed_bytes, gib, memory


def train_step_bytes(cfg, devices: Sequence, num_classes: int, batch_size: int) -> float:
    """Per-device bytes of the train step compiled at global ``batch_size`` (XLA's own count if it refuses)."""
    from train.mesh import PREFETCH_BATCHES

    try:
        c = compile_steps(dataclasses.replace(cfg, batch_size=batch_size), devices, num_classes, train_only=True)
    except OutOfMemory as e:
        return e.used
    return memory(c.train, PREFETCH_BATCHES * c.batch_bytes)["total"]


def search_largest_batch(cfg, devices: Sequence, num_classes: int, report: dict[str, Any],
                         log: Callable[[str], None]) -> int:
    """:func:`largest_fitting_batch` by compiling, from ``report``'s compile at ``cfg.batch_size``; each try is
    logged as it finishes and kept in ``report["search_compiles"]`` (global batch -> bytes a device)."""
    hbm = report["hbm_per_device"]
    peak = max(m["total"] for m in report["memory"].values())
    train = report["memory"]["train"]
    fixed = fixed_bytes(train) if "arguments" in train else 0.0  # XLA refused the first compile: total only
    tried: dict[int, float] = report.setdefault("search_compiles", {})

    def used(b: int) -> float:
        t0 = time.perf_counter()
        m = tried[b] = train_step_bytes(cfg, devices, num_classes, b)
        log(f"  --batch-size {b}: {gib(m) if math.isfinite(m) else 'more than XLA can place'} a device, "
            f"{'fits' if m <= hbm else 'too big'} ({time.perf_counter() - t0:.0f} s)")
        return m

    return largest_fitting_batch(len(devices), used, hbm, {cfg.batch_size: peak}, fixed)


def largest_fitting_batch(num_devices: int, used: Callable[[int], float], hbm: float,
                          known: dict[int, float], fixed: float = 0.0) -> int:
    """The largest multiple of the device count that fits, found by compiling (compiles are deterministic).

    ``used(b)`` is the per-device bytes at global batch ``b`` (the train step's: evaluating needs less),
    ``known`` the batches already compiled and ``fixed`` the bytes that do not grow with the batch (state,
    code) when known. Memory grows almost linearly with the batch, so each next try is read off the line
    through the two nearest known points (the first through ``fixed`` at batch 0), inside the bracket
    [fits, too big]: a few compiles in all. 0 when not even one image per device fits.
    """
    n = num_devices
    mem = {b // n: m for b, m in known.items()}  # in units of n images
    while True:
        fit = [u for u, m in mem.items() if m <= hbm]
        over = [u for u, m in mem.items() if m > hbm]
        lo, hi = max(fit, default=0), min(over, default=None)
        if hi is not None and hi - lo <= 1:
            return lo * n
        pts = sorted(mem.items(), key=lambda um: abs(um[1] - hbm))[:2]
        if len(pts) == 2 and pts[0][1] != pts[1][1]:
            (u1, m1), (u2, m2) = pts
            guess = int(u1 + (hbm - m1) * (u2 - u1) / (m2 - m1))
        else:
            u1, m1 = pts[0]
            base = fixed if 0 <= fixed < min(m1, hbm) else 0.0
            guess = int(u1 * (hbm - base) / (m1 - base))
        guess = max(lo + 1, guess if hi is None else min(hi - 1, guess))
        if guess in mem:  # the line points at a tried batch: halve the bracket instead
            guess = lo + 1 if hi is None else (lo + hi) // 2
            guess = guess if guess not in mem else max(mem) + 1
        mem[guess] = used(guess * n)
