"""``--recipe NAME``: the flags of a published ResNet training recipe, each value with its source.

A preset sets every flag its recipe defines; a flag given on the command line overrides it. The learning rate is
written for this project's ``--lr-scaling linear`` (peak lr = ``--lr`` x global batch / 256): ``--lr`` is the
published rate x 256 / the published global batch, so the peak equals the published rate at the published batch
and scales linearly with another ``--batch-size``. docs/training.md renders :func:`markdown_table` of each preset
(a test keeps the two equal).
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Any

SOURCES = {
    "tv": "torchvision's recipe of ResNet50_Weights.IMAGENET1K_V2 (its `recipe` link, "
          "https://github.com/pytorch/vision/issues/3995#issuecomment-1013906621), flags of torchvision's "
          "references/classification/train.py",
    "tv-train.py": "torchvision's references/classification/train.py: `nesterov=\"nesterov\" in opt_name` (plain "
                   "momentum for `--opt sgd`), `--lr-min` default 0.0, `CosineAnnealingLR(T_max=epochs - "
                   "lr_warmup_epochs, eta_min=lr_min)`",
    "mm": "open-mmlab/mmpretrain's reproduction of the paper (Wightman, Touvron, Jégou 2021, \"ResNet strikes "
          "back\", Table 1): configs/resnet/resnet50_8xb256-rsb-a{1-600e,2-300e,3-100e}_in1k.py, "
          "configs/_base_/schedules/imagenet_bs2048_rsb.py, configs/_base_/datasets/imagenet_bs256_rsb_a{12,3}.py "
          "(8 GPUs x 256 = 2048; LAMB; BCE (`use_sigmoid`); warm-up 5 epochs from lr x 1e-4; cosine to 1e-6)",
    "timm-cfg": "timm 1.0.31's pretrained config of resnet50.a{1,2,3}_in1k (input_size 224/224/160, crop_pct 0.95, "
                "bicubic; test at 224) and timm/data/transforms_factory.py (resize floor(224 / 0.95) = 235)",
    "timm-hparams": "timm's hfdocs/source/hparams.mdx: tags a1, a2, a3 = \"ResNet Strikes Back A{1,2,3} recipe, "
                    "LAMB with BCE loss, cosine with warmup\"; timm/data/distributed_sampler.py RepeatAugSampler "
                    "num_repeats=3",
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One flag of a preset: our value, the published value in the recipe's own terms, and where it is written."""

    value: Any
    published: str
    source: str


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A published recipe: what it trained and what it reached, and its flags."""

    title: str
    settings: dict[str, Setting]


def _tv_resnet50_v2() -> Recipe:
    s = Setting
    return Recipe("torchvision's ResNet-50 IMAGENET1K_V2 recipe (80.858% top-1)", {
        "arch": s("resnet50", "--model resnet50", "tv"),
        "batch_size": s(1024, "8 GPUs x --batch-size 128", "tv"),
        "epochs": s(600, "--epochs 600", "tv"),
        "optimizer": s("sgd", "--opt sgd", "tv"),
        "momentum": s(0.9, "--momentum 0.9", "tv"),
        "nesterov": s(False, "plain momentum (--opt sgd)", "tv-train.py"),
        "lr": s(0.125, "--lr 0.5 at batch 1024", "tv"),
        "lr_scaling": s("linear", "(0.125 x 1024 / 256 = 0.5)", "tv"),
        "lr_warmup_epochs": s(5, "--lr-warmup-epochs 5 (linear)", "tv"),
        "lr_warmup_decay": s(0.01, "--lr-warmup-decay 0.01", "tv"),
        "lr_min": s(0.0, "--lr-scheduler cosineannealinglr, --lr-min 0.0", "tv-train.py"),
        "weight_decay": s(2e-5, "--wd 2e-05, --norm-weight-decay 0.0", "tv"),
        "loss": s("ce", "cross-entropy", "tv"),
        "label_smoothing": s(0.1, "--label-smoothing 0.1", "tv"),
        "mixup_alpha": s(0.2, "--mixup-alpha 0.2", "tv"),
        "cutmix_alpha": s(1.0, "--cutmix-alpha 1.0", "tv"),
        "auto_augment": s("ta_wide", "--auto-augment ta_wide", "tv"),
        "random_erase": s(0.1, "--random-erase 0.1", "tv"),
        "ra_reps": s(4, "--ra-sampler --ra-reps 4", "tv"),
        "drop_path_rate": s(0.0, "none (torchvision's ResNet has no stochastic depth)", "tv"),
        "model_ema": s(True, "--model-ema", "tv"),
        "model_ema_steps": s(32, "--model-ema-steps 32", "tv"),
        "model_ema_decay": s(0.99998, "--model-ema-decay 0.99998", "tv"),
        "image_size": s(176, "--train-crop-size 176", "tv"),
        "val_resize_size": s(232, "--val-resize-size 232", "tv"),
        "val_crop_size": s(224, "--val-crop-size 224", "tv"),
    })


def _rsb(level: int) -> Recipe:
    s = Setting
    a1, a3 = level == 1, level == 3
    epochs = {1: 600, 2: 300, 3: 100}[level]
    lr = 8e-3 if a3 else 5e-3
    reached = " (80.4% top-1: the paper's abstract)" if a1 else ""
    return Recipe(f"timm's \"ResNet strikes back\" A{level} recipe for ResNet-50{reached}", {
        "arch": s("resnet50", "ResNet-50", "mm"),
        "batch_size": s(2048, "8 GPUs x 256", "mm"),
        "epochs": s(epochs, f"{epochs} epochs", "mm"),
        "optimizer": s("lamb", "LAMB", "mm"),
        "lr": s(lr * 256 / 2048, f"lr {lr:g} at batch 2048", "mm"),
        "lr_scaling": s("linear", f"({lr * 256 / 2048:g} x 2048 / 256 = {lr:g})", "mm"),
        "lr_warmup_epochs": s(5, "linear warm-up, 5 epochs", "mm"),
        "lr_warmup_decay": s(1e-4, "warm-up from lr x 1e-4 (LinearLR start_factor)", "mm"),
        "lr_min": s(1e-6, "cosine to eta_min 1e-6", "mm"),
        "weight_decay": s(0.01 if a1 else 0.02, f"weight decay {0.01 if a1 else 0.02}, none on BN and biases", "mm"),
        "loss": s("bce", "binary cross-entropy (use_sigmoid)", "mm"),
        "bce_target_thresh": s(None, "none", "mm"),
        "label_smoothing": s(0.1 if a1 else 0.0, "0.1" if a1 else "none", "mm"),
        "mixup_alpha": s(0.2 if a1 else 0.1, f"mixup alpha {0.2 if a1 else 0.1}", "mm"),
        "cutmix_alpha": s(1.0, "cutmix alpha 1.0", "mm"),
        "auto_augment": s("ra", "RandAugment (timm's, increasing ops, magnitude std 0.5)", "mm"),
        "ra_magnitude": s(18 if a3 else 21, f"magnitude {6 if a3 else 7} of timm's 10 levels = bin "
                                            f"{18 if a3 else 21} of torchvision's 31", "mm"),
        "random_erase": s(0.0, "none", "mm"),
        "ra_reps": s(1 if a3 else 3, "none" if a3 else "repeated augmentation (RepeatAugSampler), 3 repeats",
                     "mm" if a3 else "mm, timm-hparams"),
        "drop_path_rate": s(0.0 if a3 else 0.05, "none" if a3 else "stochastic depth 0.05", "mm"),
        "model_ema": s(False, "none", "mm"),
        "image_size": s(160 if a3 else 224, f"train at {160 if a3 else 224} px", "timm-cfg"),
        "val_resize_size": s(235, "test at 224, crop ratio 0.95 (resize 235)", "timm-cfg"),
        "val_crop_size": s(224, "224", "timm-cfg"),
    })


RECIPES: dict[str, Recipe] = {"tv-resnet50-v2": _tv_resnet50_v2(), "rsb-a1": _rsb(1), "rsb-a2": _rsb(2),
                              "rsb-a3": _rsb(3)}

DEVIATIONS = {
    "tv-resnet50-v2": "torchvision steps its warm-up and cosine once per epoch, this once per step; torchvision "
                      "also decays the classifier's bias (--norm-weight-decay 0.0 exempts normalisation layers only)",
    "rsb-a1": "timm's RandAugment (ops increasing with magnitude, Gaussian magnitude noise of std 0.5) is replaced "
              "by torchvision's at the same magnitude, timm's mixup/cutmix by torchvision's (one of the two per "
              "batch, as timm's switch probability 0.5), bicubic resizing by bilinear; schedules are stepped per "
              "step, timm's per epoch",
}
DEVIATIONS["rsb-a2"] = DEVIATIONS["rsb-a3"] = DEVIATIONS["rsb-a1"]


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def format_value(value: Any) -> str:
    """A value as written on the command line (``True`` as the bare flag, ``None`` as "unset")."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "unset" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def applied(name: str, explicit: set[str], init_from: bool) -> dict[str, Any]:
    """The field values the preset ``name`` sets: all but those given on the command line (``explicit`` field
    names); not ``arch`` with ``--init-from`` (the file says it), not the warm-up epochs with ``--warmup-steps``."""
    skip = set(explicit) | ({"arch"} if init_from else set()) | \
        ({"lr_warmup_epochs"} if "warmup_steps" in explicit else set())
    return {k: s.value for k, s in RECIPES[name].settings.items() if k not in skip}


def describe(name: str, flags: dict[str, Any]) -> dict[str, Any]:
    """What run.json records: the preset, the values it set, and the flags the command line gave otherwise."""
    settings = RECIPES[name].settings
    return {"name": name, "title": RECIPES[name].title,
            "set": {k: s.value for k, s in settings.items() if flags.get(k) == s.value},
            "overridden": {k: {"recipe": s.value, "used": flags.get(k)} for k, s in settings.items()
                           if flags.get(k) != s.value}}


def summary(name: str, flags: dict[str, Any]) -> str:
    """One line for the start of a run: the preset's flags as set, then those overridden."""
    d = describe(name, flags)
    line = f"recipe {name} ({d['title']}): " + " ".join(f"{flag_name(k)} {format_value(v)}" for k, v in
                                                        d["set"].items())
    if d["overridden"]:
        line += "; overridden: " + ", ".join(f"{flag_name(k)} {format_value(v['used'])} (recipe: "
                                             f"{format_value(v['recipe'])})" for k, v in d["overridden"].items())
    return line


def help_text() -> str:
    """The presets for ``--help``: name, title and flags."""
    lines = ["recipes (--recipe NAME; flags given on the command line override; sources in docs/training.md):"]
    for name, r in RECIPES.items():
        lines.append(f"  {name}: {r.title}")
        lines.append(textwrap.fill(" ".join(f"{flag_name(k)} {format_value(s.value)}" for k, s in r.settings.items()),
                                   width=110, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False))
    return "\n".join(lines)


def markdown_table(name: str) -> str:
    """docs/training.md's table of the preset ``name``: flag, value, the published value, source."""
    rows = ["| flag | value | published | source |", "|---|---|---|---|"]
    rows += [f"| `{flag_name(k)}` | {format_value(s.value)} | {s.published} | {s.source} |"
             for k, s in RECIPES[name].settings.items()]
    return "\n".join(rows)
