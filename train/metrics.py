"""Where training metrics go: metrics.jsonl, TensorBoard events, the progress bar, and a PNG of the curves.

In a URL workdir (an object store: no appends) metrics.jsonl is kept in memory and uploaded whole, and the
TensorBoard events are written to a local folder and uploaded file by file, by :meth:`MetricsLog.sync`: before
each checkpoint save, at least every :data:`SYNC_SECONDS` and at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from train.progress import Progress
from train.storage import AnyPath, atomic_write, is_url

SYNC_SECONDS = 60  # a URL workdir's metrics and events are uploaded at least this often


def _summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch whenever it is installed
    (2.4 s) only to accept torch tensors, and this log writes floats. torch stays importable afterwards."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # an ImportError for tensorboardX's optional `import torch`
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsLog:
    """Append-only JSON lines (one object per logged step or evaluation) mirrored to TensorBoard."""

    def __init__(self, workdir: AnyPath, enabled: bool = True):
        self.path = workdir / "metrics.jsonl"
        self.enabled = enabled
        self.remote = is_url(workdir)
        self._tb = self._tb_local = None
        self._tb_remote = workdir / "tb"
        self._lines: list[str] = []  # a URL workdir's metrics.jsonl, uploaded whole by sync()
        self._synced = time.monotonic()
        if enabled:
            if self.remote:
                self._lines = [json.dumps(r) + "\n" for r in read_metrics(self.path)]
                self._tb_local = tempfile.mkdtemp(prefix="resnet-flax-tb-")
            self._tb = _summary_writer()(self._tb_local or str(self._tb_remote))

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: after a resume they describe work that is being redone."""
        if not self.enabled or not (self._lines if self.remote else self.path.exists()):
            return
        if self.remote:
            self._lines = [line for line in self._lines if json.loads(line)["step"] <= step]
            self.sync()
            return
        keep = [json.dumps(r) for r in read_metrics(self.path) if r["step"] <= step]
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in keep)))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.remote:
            self._lines.append(json.dumps(record) + "\n")
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        for k, v in record.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(k, v, record["step"])
        if self.remote and time.monotonic() - self._synced >= SYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        """Upload a URL workdir's metrics.jsonl and TensorBoard event files (each as one object); local: no-op."""
        if not (self.enabled and self.remote):
            return
        self.path.write_text("".join(self._lines))
        self._tb.flush()
        for name in sorted(os.listdir(self._tb_local)):
            with open(os.path.join(self._tb_local, name), "rb") as f:
                data = f.read()
            (self._tb_remote / name).write_bytes(data)
        self._synced = time.monotonic()

    def close(self) -> None:
        if self._tb is None:
            return
        if self.remote:
            self.sync()
        self._tb.close()
        if self.remote:
            shutil.rmtree(self._tb_local, ignore_errors=True)
        self._tb = None


def read_metrics(path: AnyPath) -> list[dict[str, Any]]:
    """The records of ``path``, skipping a line cut short by a kill mid-write (or otherwise damaged)."""
    records = []
    for line in path.read_bytes().decode(errors="replace").splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def plot_curves(metrics_path: AnyPath, out: AnyPath) -> AnyPath | None:
    """Loss (train, val) and validation accuracy against step, as a PNG; None if nothing to plot."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax1.plot(*zip(*train), label="train loss")
    if val:
        ax1.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
        ax2.plot([r["step"] for r in val], [r["val_top1"] for r in val], "o-", label="val top-1")
        ax2.plot([r["step"] for r in val], [r["val_top5"] for r in val], "o-", label="val top-5")
    ax1.set(xlabel="step", ylabel="loss", title="loss")
    ax2.set(xlabel="step", ylabel="accuracy (%)", title="validation accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run stopped before its first evaluation has no val curves
            ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out


class TrainLog:
    """Each step's metrics stay on the device until :meth:`flush` fetches and averages them in one transfer."""

    def __init__(self, metrics: MetricsLog, progress: Progress, batch_size: int, step: int):
        self.metrics, self.progress, self.batch_size = metrics, progress, batch_size
        self.pending: list[dict[str, Any]] = []
        self.t_last, self.step_last = time.perf_counter(), step

    def add(self, step_metrics: dict[str, Any]) -> None:
        self.pending.append(step_metrics)

    def flush(self, step: int, epoch: int, skipped: int) -> list[dict[str, Any]]:
        """Write the mean of the pending steps' metrics (unless one is not finite); returns each step's metrics."""
        if not self.pending:
            return []
        host, self.pending = jax.device_get(self.pending), []
        loss = float(np.mean([m["train_loss"] for m in host]))
        if not (math.isfinite(loss) and all(bool(m["state_finite"]) for m in host)):
            return host
        now = time.perf_counter()
        ips = (step - self.step_last) * self.batch_size / max(now - self.t_last, 1e-9)
        self.t_last, self.step_last = now, step
        record = {"step": step, "epoch": epoch + 1, "train_loss": loss, "lr": float(host[-1]["lr"]),
                  "train_top1": 100 * float(np.mean([m["train_top1"] for m in host])),
                  "grad_norm": float(host[-1]["grad_norm"]), "images_per_sec": ips}
        if skipped:
            record["skipped_images"] = skipped
        self.metrics.write(record)
        self.progress.show(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{ips:.0f}")
        return host
