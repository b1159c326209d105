"""The training configuration: one typed dataclass whose fields declare each flag's default and help once."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Any

from resnet_flax.layers import COMPUTE_DTYPES
from resnet_flax.registry import ARCHS
from train import recipes
from train.storage import AnyPath, StorageError, as_path

DEFAULT_ARCH = "resnet34"
GROUPS = ("model", "data", "optimisation", "run", "tpu sizing")


def flag(default: Any, help: str, group: str, *, metavar: str | None = None, choices: list[str] | None = None,
         default_text: str | None = None, minimum: float | None = None, above: float | None = None,
         below: float | None = None, maximum: float | None = None, on_resume: str | None = None) -> Any:
    """A :class:`TrainConfig` field with its command-line flag: ``--name-with-dashes`` (``--no-name`` if True).

    The help gains "(default: X)" unless the default is None, a bool, or ``default_text`` already says it.
    ``minimum``, ``maximum`` (inclusive), ``above`` and ``below`` (exclusive) bound a number. ``on_resume``
    says what a rerun of a workdir may do with the flag: "free" (change it; the default in the run group), "compare"
    (change it only with --allow-changed-flags; the default elsewhere) or "fixed" (never: the checkpoint's
    structure depends on it).
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "group": group, "metavar": metavar, "choices": choices, "default_text": default_text,
        "minimum": minimum, "above": above, "below": below, "maximum": maximum,
        "on_resume": on_resume or ("free" if group == "run" else "compare")})


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a training run; ``python -m train --help`` documents each."""

    # model
    arch: str | None = flag(None, "architecture: " + ", ".join(ARCHS), "model", metavar="NAME", choices=list(ARCHS),
                            default_text=f"{DEFAULT_ARCH}, or that of --init-from", on_resume="fixed")
    init_from: AnyPath | None = flag(None, "start from weights: a PyTorch .pth/.pt/.safetensors/TorchScript file or "
                                           "a converted .flax.safetensors (a path or a URL); a head of another size "
                                           "is re-initialised", "model", metavar="PATH")
    dtype: str = flag("float32", "compute dtype (parameters stay float32); bfloat16 for GPUs/TPUs", "model",
                      choices=list(COMPUTE_DTYPES))
    zero_init_residual: bool = flag(False, "zero the last BN scale of each block", "model")
    drop_path_rate: float = flag(0.0, "stochastic depth as timm's ResNet: in training, block i of the net's n drops "
                                      "its residual branch, example by example, with probability X * i / (n - 1)",
                                 "model", metavar="X", minimum=0, below=1)
    # data
    dataset: str = flag("tf_flowers", "TFDS name (tf_flowers, imagenette, imagenet2012, cifar10, ...) or "
                                      "'synthetic'", "data", metavar="NAME")
    data_dir: AnyPath | None = flag(None, "a folder of images with one sub-folder per class (overrides --dataset); "
                                          "a path or a URL (gs://...)", "data", metavar="PATH")
    tfds_data_dir: AnyPath | None = flag(None, "where TFDS keeps prepared datasets (a path or a URL)", "data",
                                         metavar="PATH", on_resume="free")
    val_fraction: float = flag(0.2, "held-out fraction when the data has no validation split", "data", metavar="X",
                               minimum=0, below=1)
    image_size: int = flag(224, "training crop size (RandomResizedCrop); also evaluation's unless --val-crop-size",
                           "data", metavar="PX", minimum=1)
    val_resize_size: int | None = flag(None, "evaluation: resize the shorter side to PX (torchvision's "
                                             "--val-resize-size)", "data", metavar="PX", minimum=1,
                                       default_text="the evaluation crop x 256/224")
    val_crop_size: int | None = flag(None, "evaluation: then centre-crop PX (torchvision's --val-crop-size)", "data",
                                     metavar="PX", minimum=1, default_text="--image-size")
    ra_reps: int = flag(1, "repeated augmentation (torchvision's --ra-sampler --ra-reps N; its recipe: 4): each "
                           "image N times per epoch, differently augmented, spread over the devices as "
                           "RASampler spreads it over replicas; an epoch is then the examples rounded down to a "
                           "multiple of 256; 1: off", "data", metavar="N", minimum=1)
    num_workers: int | None = flag(None, "data loader processes per host (0: threads in the main process)", "data",
                                   metavar="N", minimum=0, on_resume="free",
                                   default_text="0 on a host with 2 CPUs or fewer, where worker processes slow the "
                                                "loader and the steps they compete with; else 2")
    auto_augment: str | None = flag(None, "torchvision's automatic augmentation after the crop and flip: ta_wide "
                                          "(TrivialAugmentWide), ra (RandAugment), imagenet/cifar10/svhn "
                                          "(AutoAugment's policies)", "data", choices=["ta_wide", "ra", "imagenet",
                                                                                       "cifar10", "svhn"])
    ra_magnitude: int = flag(9, "RandAugment's magnitude bin (of 31) for --auto-augment ra", "data", metavar="M",
                             minimum=0, maximum=30)
    random_erase: float = flag(0.0, "probability of torchvision's RandomErasing (a random box set to 0 after "
                                    "normalisation)", "data", metavar="P", minimum=0, maximum=1)
    mixup_alpha: float = flag(0.0, "mixup's Beta(alpha, alpha) (torchvision.transforms.v2.MixUp; with "
                                   "--cutmix-alpha one of the two per batch); 0: off", "data", metavar="X", minimum=0)
    cutmix_alpha: float = flag(0.0, "cutmix's Beta(alpha, alpha) (torchvision.transforms.v2.CutMix); 0: off", "data",
                               metavar="X", minimum=0)
    # optimisation
    recipe: str | None = flag(None, "set the flags of a published recipe (listed at the end); flags given on the "
                                    "command line override its values", "optimisation", metavar="NAME",
                              choices=list(recipes.RECIPES))
    batch_size: int = flag(128, "global batch size, split over all devices and hosts", "optimisation", metavar="N",
                           minimum=1)
    epochs: int = flag(30, "passes over the training data (a rerun may extend the run)", "optimisation",
                       metavar="N", minimum=1, on_resume="free")
    max_steps: int | None = flag(None, "stop after N steps in all (overrides --epochs)", "optimisation",
                                 metavar="N", minimum=1, on_resume="free")
    optimizer: str = flag("adamw", "optimizer: sgd, adamw, lamb (timm's Lamb, as ResNet strikes back uses it) or "
                                   "lars (MLPerf's LARS; takes --momentum and --nesterov as sgd does)", "optimisation",
                          choices=["sgd", "adamw", "lamb", "lars"], on_resume="fixed")
    lr: float = flag(1e-4, "peak learning rate at batch size 256 (scaled by --lr-scaling)", "optimisation",
                     metavar="X", above=0)
    lr_scaling: str = flag("linear", "linear: peak lr = LR * batch_size / 256", "optimisation",
                           choices=["linear", "none"])
    warmup_steps: int = flag(20, "linear warm-up steps before the cosine decay", "optimisation", metavar="N",
                             minimum=0)
    lr_warmup_epochs: int | None = flag(None, "warm-up length in epochs instead of --warmup-steps (torchvision's "
                                              "flag)", "optimisation", metavar="N", minimum=0)
    lr_warmup_decay: float = flag(0.0, "the linear warm-up starts at the peak lr times X (torchvision's "
                                       "--lr-warmup-decay; its recipes use 0.01)", "optimisation", metavar="X",
                                  minimum=0, maximum=1)
    lr_min: float = flag(0.0, "the cosine decay ends at this learning rate (not scaled by --lr-scaling)",
                         "optimisation", metavar="X", minimum=0)
    weight_decay: float = flag(0.05, "weight decay on conv/linear kernels (never BatchNorm or biases): decoupled for "
                                     "adamw, added to the gradient for sgd and lars, to Adam's update for lamb",
                               "optimisation", metavar="X", minimum=0)
    momentum: float = flag(0.9, "momentum of sgd and lars", "optimisation", metavar="X", minimum=0, below=1)
    nesterov: bool = flag(True, "plain (not Nesterov) momentum for sgd and lars", "optimisation")
    label_smoothing: float = flag(0.1, "label smoothing of the loss's targets", "optimisation", metavar="X",
                                  minimum=0, below=1)
    loss: str = flag("ce", "training loss: ce (softmax cross-entropy) or bce (timm's BinaryCrossEntropy, as ResNet "
                           "strikes back uses it: a sigmoid per class, mean over classes and examples, the one-hot or "
                           "mixed targets smoothed by --label-smoothing)", "optimisation", choices=["ce", "bce"])
    bce_target_thresh: float | None = flag(None, "with --loss bce: targets above X become 1, the others 0 (timm's "
                                                 "--bce-target-thresh)", "optimisation", metavar="X", minimum=0,
                                           below=1)
    grad_accum_steps: int = flag(1, "split each global batch into K micro-batches, one after the other in the step, "
                                    "and update once with their summed gradients (for a --batch-size that does not "
                                    "fit the devices; BatchNorm statistics are then per micro-batch)",
                                 "optimisation", metavar="K", minimum=1)
    seed: int = flag(0, "seed for init, shuffling, augmentation", "optimisation", metavar="N")
    model_ema: bool = flag(False, "keep torchvision's exponential moving average of the weights and BatchNorm "
                                  "statistics, evaluated beside the model (val_top1_ema, ...), checkpointed, used by "
                                  "train.predict --ema; the best checkpoint is still chosen by the model's val_top1",
                           "optimisation", on_resume="fixed")
    model_ema_steps: int = flag(32, "update the EMA every N steps (at batch 0, N, 2N, ... of each epoch)",
                                "optimisation", metavar="N", minimum=1)
    model_ema_decay: float = flag(0.99998, "EMA decay before torchvision's adjustment: the decay applied is "
                                           "1 - min(1, (1 - X) * batch_size * N / epochs)", "optimisation",
                                  metavar="X", minimum=0, maximum=1)
    # run
    workdir: AnyPath = flag(Path("workdir"), "checkpoints, metrics.jsonl, TensorBoard events and the plot go here "
                                             "(a path or a URL: gs://bucket/run)", "run", metavar="DIR")
    resume: bool = flag(False, "require a checkpoint in --workdir and continue from it (rerunning resumes anyway)",
                        "run")
    eval_only: bool = flag(False, "evaluate (--init-from or the workdir's best) and exit", "run")
    allow_changed_flags: bool = flag(False, "resume a --workdir with other values of its run-defining flags "
                                            "(--lr, --label-smoothing, ...; recorded in run.json)", "run")
    log_every: int = flag(10, "log training metrics every N steps", "run", metavar="N", minimum=1)
    checkpoint_every: int = flag(500, "checkpoint every N steps (and at each epoch end)", "run", metavar="N",
                                 minimum=1)
    keep_checkpoints: int = flag(3, "keep the last K checkpoints (plus the best by validation top-1)", "run",
                                 metavar="K", minimum=1)
    eval_every_epochs: int = flag(1, "evaluate every N epochs (and after the last)", "run", metavar="N", minimum=1)
    distributed: bool = flag(False, "multi-host: call jax.distributed.initialize(), which finds the hosts itself on "
                                    "TPU pods and SLURM/Kubernetes clusters", "run")
    coordinator: str | None = flag(None, "multi-host by hand: HOST:PORT of process 0, with --num-processes and "
                                         "--process-id (e.g. several processes on one machine)", "run",
                                   metavar="HOST:PORT")
    num_processes: int | None = flag(None, "multi-host by hand: how many processes take part", "run", metavar="N",
                                     minimum=1)
    process_id: int | None = flag(None, "multi-host by hand: this process's index, 0 .. N-1", "run", metavar="I",
                                  minimum=0)
    host_timeout: int = flag(100, "multi-host: seconds without a heartbeat after which the other hosts give up on "
                                  "a host and exit (JAX's heartbeat timeout)", "run", metavar="S", minimum=1)
    progress: bool = flag(True, "no progress bar", "run")
    compile_cache: str | None = flag(None, "keep compiled XLA programs in DIR so that a rerun, a resume or an "
                                           "evaluation compiles nothing twice; 'off' to compile from scratch", "run",
                                     metavar="DIR", default_text="$JAX_COMPILATION_CACHE_DIR, else "
                                                                 "~/.cache/resnet_flax/xla")
    # sizing for a TPU, without one
    compile_only: bool = flag(False, "compile the run's train/eval steps for --topology and print memory per chip vs "
                                     "HBM, FLOPs, the roofline images/s and the collectives; trains nothing (needs "
                                     "the tpu extra)", "tpu sizing")
    topology: str | None = flag(None, "TPU topology for --compile-only: v5e:2x4, v6e:2x4, v5p:2x2x1, v4:2x2x1, "
                                      "v5e:16x16 (64 hosts), ...", "tpu sizing", metavar="NAME")

    def __post_init__(self):
        for name in ("workdir", "data_dir", "tfds_data_dir", "init_from"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, as_path(getattr(self, name)))

    @property
    def multi_host(self) -> bool:
        """Whether the run calls ``jax.distributed.initialize`` (detected hosts, or the three flags)."""
        return self.distributed or self.coordinator is not None

    @property
    def resolved_arch(self) -> str:
        return self.arch or DEFAULT_ARCH

    @property
    def resolved_num_workers(self) -> int:
        """``--num-workers``, else 0 on a host with 2 CPUs or fewer (docs/performance.md measures why), else 2."""
        if self.num_workers is not None:
            return self.num_workers
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return 0 if cpus <= 2 else 2


DESCRIPTION = """\
Train (or fine-tune, or evaluate) a torchvision-style ResNet in JAX/Flax: one jit-compiled train step,
data parallel over every device JAX sees, Orbax checkpoints, and torchvision's preprocessing.

examples:
  python -m train --arch resnet34 --workdir runs/flowers                      # tf_flowers from TFDS, 80/20 split
  python -m train --arch resnet18 --data-dir ~/flower_photos --workdir runs/folder   # one sub-folder per class
  python -m train --init-from resnet50.pth --dataset imagenette --epochs 5 --workdir runs/finetune
  python -m train --eval-only --init-from resnet50.pth --dataset imagenet2012 --workdir runs/eval  # 76.13% top-1
  python -m train --dataset synthetic --arch resnet18 --image-size 64 --batch-size 32 --max-steps 50 \\
      --workdir runs/smoke

Re-running the same command with the same --workdir continues where it stopped (or pass --resume).
The workdir holds checkpoints/, metrics.jsonl, TensorBoard events (tb/) and curves.png.
"""


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    """The ``python -m train`` command line, generated from the fields of :class:`TrainConfig` (``suppress``: no
    defaults, so that a parse holds only the flags given)."""
    p = _Parser(prog="python -m train", description=DESCRIPTION, epilog=recipes.help_text(),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        m, name = f.metadata, f.name.replace("_", "-")
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        if kind is bool:
            groups[m["group"]].add_argument(f"--no-{name}" if f.default else f"--{name}", dest=f.name,
                                            action="store_false" if f.default else "store_true", help=m["help"],
                                            **({"default": argparse.SUPPRESS} if suppress else {}))
            continue
        shown = m["default_text"] or (None if f.default is None else str(f.default))
        groups[m["group"]].add_argument(f"--{name}", type=_path_arg if kind is Path else kind,
                                        default=argparse.SUPPRESS if suppress else f.default,
                                        choices=m["choices"], metavar=m["metavar"],
                                        help=m["help"] + (f" (default: {shown})" if shown else ""))
    return p


def _path_arg(text: str) -> AnyPath:
    """A local path, or a URL whose storage client is installed (else argparse's one-line error)."""
    try:
        return as_path(text)
    except StorageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, exit 2 (argparse prints the whole usage first)."""
        self.exit(2, f"error: {message}; see python -m train --help\n")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """argv -> :class:`TrainConfig`, rejecting values that cannot work with a one-line message."""
    p = build_parser()
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    explicit = set(vars(build_parser(suppress=True).parse_args(argv)))
    if {"warmup_steps", "lr_warmup_epochs"} <= explicit:
        p.error("--warmup-steps and --lr-warmup-epochs both set the warm-up's length; give one of them")
    if cfg.recipe is not None:
        cfg = dataclasses.replace(cfg, **recipes.applied(cfg.recipe, explicit, cfg.init_from is not None))
    for f in dataclasses.fields(TrainConfig):
        if (problem := _out_of_range(getattr(cfg, f.name), f.metadata)) is not None:
            p.error(f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)}: {problem}")
    if cfg.compile_only != (cfg.topology is not None):
        p.error("--compile-only and --topology NAME go together (e.g. --compile-only --topology v5e:2x4)")
    by_hand = (cfg.coordinator, cfg.num_processes, cfg.process_id)
    if any(v is not None for v in by_hand) and any(v is None for v in by_hand):
        p.error("--coordinator HOST:PORT, --num-processes N and --process-id I go together")
    if cfg.process_id is not None and cfg.process_id >= cfg.num_processes:
        p.error(f"--process-id {cfg.process_id}: must be below --num-processes {cfg.num_processes}")
    if cfg.bce_target_thresh is not None and cfg.loss != "bce":
        p.error("--bce-target-thresh applies to --loss bce only")
    if cfg.batch_size % cfg.grad_accum_steps:
        p.error(f"--batch-size {cfg.batch_size}: must be a multiple of --grad-accum-steps {cfg.grad_accum_steps}")
    if cfg.eval_only and cfg.init_from is None and not (cfg.workdir / "checkpoints").is_dir():
        p.error("--eval-only needs --init-from PATH or a --workdir with checkpoints")
    return cfg


def _out_of_range(value: Any, m: typing.Mapping[str, Any]) -> str | None:
    """What is wrong with ``value`` under the field's bounds, or None."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    if not math.isfinite(value):
        return "must be a finite number"
    lo, hi = m.get("minimum"), m.get("below")
    if m.get("above") is not None and value <= m["above"]:
        return f"must be greater than {m['above']}"
    if lo is not None and value < lo:
        return f"must be at least {lo}" + (f" and below {hi}" if hi is not None else "")
    if hi is not None and value >= hi:
        return f"must be below {hi}" + (f" (and at least {lo})" if lo is not None else "")
    if m.get("maximum") is not None and value > m["maximum"]:
        return f"must be at most {m['maximum']}" + (f" (and at least {lo})" if lo is not None else "")
    return None
