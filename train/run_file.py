"""``run.json``: the model structure, class names and flags of a training run, and the resume check."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from resnet_flax.io import atomic_write
from resnet_flax.model import ResNetConfig
from train.config import TrainConfig
from train.errors import RunError

RUN_FILE = "run.json"  # model config + class names: what predict needs to rebuild the model
COMPARED_ON_RESUME = ("dataset", "data_dir", "image_size", "batch_size", "seed", "dtype", "optimizer")


def read_run_file(workdir: Path) -> dict[str, Any]:
    """The ``run.json`` of ``workdir``: ``model`` (a ResNetConfig dict), ``class_names``, ``dtype``, ``flags``."""
    return json.loads((Path(workdir) / RUN_FILE).read_text())


def flags_of(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as JSON-ready values (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def write_run_file(cfg: TrainConfig, model_config: ResNetConfig, class_names: list[str]) -> None:
    """Write ``run.json`` for predict and for resume checks."""
    record = {"model": model_config.to_dict(), "class_names": class_names, "dtype": cfg.dtype, "flags": flags_of(cfg)}
    atomic_write(cfg.workdir / RUN_FILE, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))


def check_same_run(cfg: TrainConfig) -> None:
    """Refuse to resume a workdir written by a run with other data/model settings."""
    if not (cfg.workdir / RUN_FILE).exists():
        return
    old, new = read_run_file(cfg.workdir)["flags"], flags_of(cfg)
    changed = [k for k in COMPARED_ON_RESUME if old.get(k) != new.get(k)]
    if (old.get("arch") or None) != (cfg.arch or None) and cfg.arch is not None:
        changed.append("arch")
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {old.get(k)} -> {new.get(k)}" for k in changed)
        raise RunError(f"{cfg.workdir} holds a run with other settings ({diffs}); "
                       "use a new --workdir or the original flags")
