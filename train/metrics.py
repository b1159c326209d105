"""Where training metrics go: metrics.jsonl, TensorBoard events, and a PNG of the curves."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from resnet_flax.io import atomic_write


class MetricsLog:
    """Append-only JSON lines (one object per logged step or evaluation) mirrored to TensorBoard."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.path = workdir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tb"))

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: after a resume they describe work that is being redone."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in keep)))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for k, v in record.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_curves(metrics_path: Path, out: Path) -> Path | None:
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
        ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out
