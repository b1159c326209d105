"""The training configuration (a typed dataclass) and the command line that fills it."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from resnet_flax.model import ARCHS

DEFAULT_ARCH = "resnet34"


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a training run; ``python -m train --help`` documents each."""

    arch: str | None = None  # None: DEFAULT_ARCH, or the architecture of --init-from
    dataset: str = "tf_flowers"
    data_dir: Path | None = None
    tfds_data_dir: Path | None = None
    image_size: int = 224
    batch_size: int = 128
    epochs: int = 30
    max_steps: int | None = None
    optimizer: str = "adamw"
    lr: float = 1e-4
    lr_scaling: str = "linear"
    warmup_steps: int = 20
    weight_decay: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    label_smoothing: float = 0.1
    dtype: str = "float32"
    workdir: Path = Path("workdir")
    resume: bool = False
    init_from: Path | None = None
    eval_only: bool = False
    seed: int = 0
    num_workers: int = 2
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every_epochs: int = 1
    val_fraction: float = 0.2
    zero_init_residual: bool = False
    distributed: bool = False
    progress: bool = True
    compile_only: bool = False
    topology: str | None = None

    @property
    def resolved_arch(self) -> str:
        return self.arch or DEFAULT_ARCH


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


DESCRIPTION = """\
Train (or fine-tune, or evaluate) a torchvision-style ResNet in JAX/Flax: one jit-compiled train step,
data parallel over every device JAX sees, Orbax checkpoints, and torchvision's preprocessing.

examples:
  python -m train --arch resnet34                              # tf_flowers from TFDS, 80/20 split
  python -m train --arch resnet18 --data-dir ~/flower_photos   # your own folder: one sub-folder per class
  python -m train --init-from resnet50.pth --dataset imagenette --lr 1e-4 --epochs 5   # fine-tune PyTorch weights
  python -m train --eval-only --init-from resnet50.pth --dataset imagenet2012          # reproduce 76.13% top-1
  python -m train --dataset synthetic --max-steps 50                                   # smoke run / benchmark

Re-running the same command with the same --workdir continues where it stopped (or pass --resume).
The workdir holds checkpoints/, metrics.jsonl, TensorBoard events (tb/) and curves.png.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m train`` command line."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m train", description=DESCRIPTION, formatter_class=_Formatter)
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=list(ARCHS), metavar="NAME", default=None,
                   help=f"architecture: {', '.join(ARCHS)} (default {DEFAULT_ARCH}, or that of --init-from)")
    g.add_argument("--init-from", type=Path, metavar="PATH",
                   help="start from weights: a PyTorch .pth/.pt/.safetensors/TorchScript file or a converted "
                        ".flax.safetensors; a head of another size is re-initialised")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.dtype,
                   help="compute dtype (parameters stay float32); bfloat16 for GPUs/TPUs")
    g.add_argument("--zero-init-residual", action="store_true", help="zero the last BN scale of each block")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, metavar="NAME",
                   help="TFDS name (tf_flowers, imagenette, imagenet2012, cifar10, ...) or 'synthetic'")
    g.add_argument("--data-dir", type=Path, metavar="PATH",
                   help="a folder of images with one sub-folder per class (overrides --dataset)")
    g.add_argument("--tfds-data-dir", type=Path, metavar="PATH", help="where TFDS keeps prepared datasets")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="held-out fraction when the data has no validation split")
    g.add_argument("--image-size", type=int, default=d.image_size, metavar="PX",
                   help="training crop size; evaluation resizes to PX*256/224 then centre-crops PX")
    g.add_argument("--num-workers", type=int, default=d.num_workers, metavar="N",
                   help="data loader processes per host (0: in the main process)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N",
                   help="global batch size, split over all devices and hosts")
    g.add_argument("--epochs", type=int, default=d.epochs, metavar="N", help="passes over the training data")
    g.add_argument("--max-steps", type=int, metavar="N", help="stop after N steps in all (overrides --epochs)")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default=d.optimizer, help="optimizer")
    g.add_argument("--lr", type=float, default=d.lr, metavar="X",
                   help="peak learning rate at batch size 256 (scaled by --lr-scaling)")
    g.add_argument("--lr-scaling", choices=["linear", "none"], default=d.lr_scaling,
                   help="linear: peak lr = LR * batch_size / 256")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, metavar="N",
                   help="linear warm-up steps before the cosine decay")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, metavar="X",
                   help="decoupled weight decay on conv/linear kernels (never BatchNorm or biases)")
    g.add_argument("--momentum", type=float, default=d.momentum, metavar="X", help="SGD momentum")
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false", help="plain (not Nesterov) momentum")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing, metavar="X",
                   help="label smoothing of the cross-entropy targets")
    g.add_argument("--seed", type=int, default=d.seed, metavar="N", help="seed for init, shuffling, augmentation")

    g = p.add_argument_group("run")
    g.add_argument("--workdir", type=Path, default=d.workdir, metavar="DIR",
                   help="checkpoints, metrics.jsonl, TensorBoard events and the plot go here")
    g.add_argument("--resume", action="store_true",
                   help="require a checkpoint in --workdir and continue from it (rerunning resumes anyway)")
    g.add_argument("--eval-only", action="store_true", help="evaluate (--init-from or the workdir's best) and exit")
    g.add_argument("--log-every", type=int, default=d.log_every, metavar="N", help="log training metrics every N steps")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="N",
                   help="checkpoint every N steps (and at each epoch end)")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, metavar="K",
                   help="keep the last K checkpoints (plus the best by validation top-1)")
    g.add_argument("--eval-every-epochs", type=int, default=d.eval_every_epochs, metavar="N",
                   help="evaluate every N epochs (and after the last)")
    g.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() (TPU pods, SLURM/GPU clusters)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    g = p.add_argument_group("sizing for a TPU (no TPU needed)")
    g.add_argument("--compile-only", action="store_true",
                   help="compile the run's train/eval steps for --topology and print per-chip memory vs HBM, FLOPs, "
                        "the roofline images/s and the collectives; trains nothing (needs the [tpu] extra)")
    g.add_argument("--topology", metavar="NAME",
                   help="TPU topology for --compile-only, e.g. v5e:2x4, v6e:2x4, v5p:2x2x1, v5e:16x16 (64 hosts)")
    return p


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """argv -> :class:`TrainConfig`, rejecting values that cannot work with a one-line message."""
    p = build_parser()
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    for name in ("batch_size", "image_size", "epochs", "log_every", "checkpoint_every", "keep_checkpoints",
                 "eval_every_epochs"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        p.error("--max-steps must be at least 1")
    if not 0 <= cfg.label_smoothing < 1:
        p.error("--label-smoothing must be in [0, 1)")
    if cfg.compile_only != (cfg.topology is not None):
        p.error("--compile-only and --topology NAME go together (e.g. --compile-only --topology v5e:2x4)")
    if cfg.eval_only and cfg.init_from is None and not (cfg.workdir / "checkpoints").is_dir():
        p.error("--eval-only needs --init-from PATH or a --workdir with checkpoints")
    return cfg
