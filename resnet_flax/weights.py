"""The pretrained weights torchvision publishes for each ResNet, as torchvision's ``ResNet50_Weights`` enums.

Pure data (no torch, no network): where each file lives, its hash, the evaluation transform it expects, its
parameter count and published ImageNet accuracy. ``tests/test_weights.py`` checks every field against
torchvision's own enums. Downloading and converting is :mod:`resnet_flax.hub`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import re
from pathlib import Path
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_URL = "https://download.pytorch.org/models/"
_CATEGORIES_FILE = Path(__file__).with_name("imagenet_classes.txt")
HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's: the sha256 prefix in ``resnet50-11ad3fa6.pth``


@functools.cache
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1K class names in torchvision's order (``weights.meta["categories"]``)."""
    return tuple(_CATEGORIES_FILE.read_text().splitlines())


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """torchvision's ``ImageClassification`` preset: resize the shorter side, centre-crop, normalise."""

    crop_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    antialias: bool = True


@dataclasses.dataclass(frozen=True)
class Weights:
    """One published weights file: torchvision's ``Weights`` (url, transforms, meta) plus its architecture."""

    arch: str
    name: str
    url: str
    num_params: int
    acc1: float
    acc5: float
    gflops: float
    file_size_mb: float
    recipe: str
    docs: str
    transforms: EvalTransform
    min_size: tuple[int, int] = (1, 1)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_prefix(self) -> str:
        """The sha256 prefix torch.hub checks, taken from the file name (``11ad3fa6``)."""
        m = HASH_REGEX.search(self.filename)
        return m.group(1) if m else ""

    @property
    def categories(self) -> tuple[str, ...]:
        return imagenet_categories()

    @property
    def meta(self) -> dict[str, Any]:
        """The same dictionary torchvision's ``weights.meta`` holds."""
        return {"categories": list(self.categories), "min_size": self.min_size, "num_params": self.num_params,
                "recipe": self.recipe, "_metrics": {"ImageNet-1K": {"acc@1": self.acc1, "acc@5": self.acc5}},
                "_ops": self.gflops, "_file_size": self.file_size_mb, "_docs": self.docs}


class WeightsEnum(enum.Enum):
    """Base of ``ResNet50_Weights`` etc.: members are :class:`Weights`; ``DEFAULT`` is an alias of the best."""

    @property
    def url(self) -> str:
        return self.value.url

    @property
    def meta(self) -> dict[str, Any]:
        return self.value.meta

    @property
    def transforms(self) -> EvalTransform:
        return self.value.transforms

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


_DOCS_V1 = "These weights reproduce closely the results of the paper using a simple training recipe."
_NEW_RECIPE = ("TorchVision's `new training recipe "
               "<https://pytorch.org/blog/how-to-train-state-of-the-art-models-using-torchvision-latest-primitives/>`_.")
_DOCS_V2 = "These weights improve upon the results of the original paper by using " + _NEW_RECIPE
_DOCS_SCRATCH = "These weights were trained from scratch by using " + _NEW_RECIPE
_RECIPE_RESNET = "https://github.com/pytorch/vision/tree/main/references/classification#resnet"
_RECIPE_RESNEXT = "https://github.com/pytorch/vision/tree/main/references/classification#resnext"
_RECIPE_WIDE = "https://github.com/pytorch/vision/pull/912#issue-445437439"
_NEW = "https://github.com/pytorch/vision/issues/3995#new-recipe"


def _w(arch: str, name: str, filename: str, num_params: int, acc1: float, acc5: float, gflops: float,
       file_size_mb: float, resize_size: int, recipe: str, docs: str) -> Weights:
    return Weights(arch, name, TORCHVISION_URL + filename, num_params, acc1, acc5, gflops, file_size_mb, recipe,
                   docs, EvalTransform(crop_size=224, resize_size=resize_size))


# Copied from torchvision 0.29 models/resnet.py (tests/test_weights.py compares every field).
_ALL = [
    _w("resnet18", "IMAGENET1K_V1", "resnet18-f37072fd.pth", 11689512, 69.758, 89.078, 1.814, 44.661, 256,
       _RECIPE_RESNET, _DOCS_V1),
    _w("resnet34", "IMAGENET1K_V1", "resnet34-b627a593.pth", 21797672, 73.314, 91.42, 3.664, 83.275, 256,
       _RECIPE_RESNET, _DOCS_V1),
    _w("resnet50", "IMAGENET1K_V1", "resnet50-0676ba61.pth", 25557032, 76.13, 92.862, 4.089, 97.781, 256,
       _RECIPE_RESNET, _DOCS_V1),
    _w("resnet50", "IMAGENET1K_V2", "resnet50-11ad3fa6.pth", 25557032, 80.858, 95.434, 4.089, 97.79, 232,
       "https://github.com/pytorch/vision/issues/3995#issuecomment-1013906621", _DOCS_V2),
    _w("resnet101", "IMAGENET1K_V1", "resnet101-63fe2227.pth", 44549160, 77.374, 93.546, 7.801, 170.511, 256,
       _RECIPE_RESNET, _DOCS_V1),
    _w("resnet101", "IMAGENET1K_V2", "resnet101-cd907fc2.pth", 44549160, 81.886, 95.78, 7.801, 170.53, 232,
       _NEW, _DOCS_V2),
    _w("resnet152", "IMAGENET1K_V1", "resnet152-394f9c45.pth", 60192808, 78.312, 94.046, 11.514, 230.434, 256,
       _RECIPE_RESNET, _DOCS_V1),
    _w("resnet152", "IMAGENET1K_V2", "resnet152-f82ba261.pth", 60192808, 82.284, 96.002, 11.514, 230.474, 232,
       _NEW, _DOCS_V2),
    _w("resnext50_32x4d", "IMAGENET1K_V1", "resnext50_32x4d-7cdf4587.pth", 25028904, 77.618, 93.698, 4.23, 95.789,
       256, _RECIPE_RESNEXT, _DOCS_V1),
    _w("resnext50_32x4d", "IMAGENET1K_V2", "resnext50_32x4d-1a0047aa.pth", 25028904, 81.198, 95.34, 4.23, 95.833,
       232, _NEW, _DOCS_V2),
    _w("resnext101_32x8d", "IMAGENET1K_V1", "resnext101_32x8d-8ba56ff5.pth", 88791336, 79.312, 94.526, 16.414,
       339.586, 256, _RECIPE_RESNEXT, _DOCS_V1),
    _w("resnext101_32x8d", "IMAGENET1K_V2", "resnext101_32x8d-110c445d.pth", 88791336, 82.834, 96.228, 16.414,
       339.673, 232, _NEW + "-with-fixres", _DOCS_V2),
    _w("resnext101_64x4d", "IMAGENET1K_V1", "resnext101_64x4d-173b62eb.pth", 83455272, 83.246, 96.454, 15.46,
       319.318, 232, "https://github.com/pytorch/vision/pull/5935", _DOCS_SCRATCH),
    _w("wide_resnet50_2", "IMAGENET1K_V1", "wide_resnet50_2-95faca4d.pth", 68883240, 78.468, 94.086, 11.398, 131.82,
       256, _RECIPE_WIDE, _DOCS_V1),
    _w("wide_resnet50_2", "IMAGENET1K_V2", "wide_resnet50_2-9ba9bcbe.pth", 68883240, 81.602, 95.758, 11.398,
       263.124, 232, _NEW + "-with-fixres", _DOCS_V2),
    _w("wide_resnet101_2", "IMAGENET1K_V1", "wide_resnet101_2-32ee1156.pth", 126886696, 78.848, 94.284, 22.753,
       242.896, 256, _RECIPE_WIDE, _DOCS_V1),
    _w("wide_resnet101_2", "IMAGENET1K_V2", "wide_resnet101_2-d733dc28.pth", 126886696, 82.51, 96.02, 22.753,
       484.747, 232, _NEW, _DOCS_V2),
]

# architecture -> torchvision's enum name
ENUM_NAMES = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights",
              "resnet101": "ResNet101_Weights", "resnet152": "ResNet152_Weights",
              "resnext50_32x4d": "ResNeXt50_32X4D_Weights", "resnext101_32x8d": "ResNeXt101_32X8D_Weights",
              "resnext101_64x4d": "ResNeXt101_64X4D_Weights", "wide_resnet50_2": "Wide_ResNet50_2_Weights",
              "wide_resnet101_2": "Wide_ResNet101_2_Weights"}


def _make_enum(arch: str) -> type[WeightsEnum]:
    members = [(w.name, w) for w in _ALL if w.arch == arch]
    members.append(("DEFAULT", members[-1][1]))  # torchvision's DEFAULT is the newest: an alias, not a copy
    return WeightsEnum(ENUM_NAMES[arch], members, module=__name__)


REGISTRY: dict[str, type[WeightsEnum]] = {arch: _make_enum(arch) for arch in ENUM_NAMES}
ResNet18_Weights = REGISTRY["resnet18"]
ResNet34_Weights = REGISTRY["resnet34"]
ResNet50_Weights = REGISTRY["resnet50"]
ResNet101_Weights = REGISTRY["resnet101"]
ResNet152_Weights = REGISTRY["resnet152"]
ResNeXt50_32X4D_Weights = REGISTRY["resnext50_32x4d"]
ResNeXt101_32X8D_Weights = REGISTRY["resnext101_32x8d"]
ResNeXt101_64X4D_Weights = REGISTRY["resnext101_64x4d"]
Wide_ResNet50_2_Weights = REGISTRY["wide_resnet50_2"]
Wide_ResNet101_2_Weights = REGISTRY["wide_resnet101_2"]


def get_weights(arch: str, weights: str | WeightsEnum | Weights | bool) -> Weights:
    """Resolve ``"IMAGENET1K_V2"``, ``"DEFAULT"``, ``"ResNet50_Weights.IMAGENET1K_V2"``, an enum member or
    ``True`` (torchvision's ``pretrained=True``: the V1 weights) for ``arch``."""
    if arch not in REGISTRY:
        raise ValueError(f"torchvision publishes no weights for {arch!r} (it has them for {', '.join(REGISTRY)}); "
                         f"timm's are on the Hugging Face Hub: weights='hf-hub:timm/{arch}.<tag>'")
    enum_cls = REGISTRY[arch]
    if isinstance(weights, Weights):
        w = weights
    elif isinstance(weights, WeightsEnum):
        w = weights.value
    elif weights is True:
        w = enum_cls["IMAGENET1K_V1"].value
    elif isinstance(weights, str):
        owner, _, name = weights.rpartition(".")
        if owner and owner not in {enum_cls.__name__, *ENUM_NAMES.values()}:
            name = weights
        try:
            w = enum_cls[name].value if owner in ("", enum_cls.__name__) else REGISTRY[
                next(a for a, n in ENUM_NAMES.items() if n == owner)][name].value
        except KeyError:
            raise ValueError(f"unknown weights {weights!r} for {arch}; choose one of: "
                             f"{', '.join(enum_cls.__members__)}") from None
    else:
        raise TypeError(f"weights must be a name, a {enum_cls.__name__} member or True, got {type(weights).__name__}")
    if w.arch != arch:
        raise ValueError(f"weights {w.arch}/{w.name} are for {w.arch}, not {arch}")
    return w


@dataclasses.dataclass
class WeightsInfo:
    """What a converted file records about its weights besides the tensors (any field may be unknown)."""

    class_names: list[str] | None = None
    transform: EvalTransform | None = None
    source: str | None = None   # URL, hub name or path it was converted from
    sha256: str | None = None   # of the source file
    weights: str | None = None  # e.g. "ResNet50_Weights.IMAGENET1K_V2"
    weights_set: str | None = None  # "ema" or "model" for checkpoints that hold both

    def to_metadata(self) -> dict[str, str]:
        """Safetensors header entries (strings only; lists and the transform as JSON)."""
        out = {k: v for k in ("source", "sha256", "weights", "weights_set") if (v := getattr(self, k)) is not None}
        if self.class_names is not None:
            out["class_names"] = json.dumps(list(self.class_names))
        if self.transform is not None:
            out["eval_transform"] = json.dumps(dataclasses.asdict(self.transform))
        return out

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> WeightsInfo:
        """The inverse of :meth:`to_metadata`; entries that do not parse are treated as unknown."""
        info = cls(**{k: meta[k] for k in ("source", "sha256", "weights", "weights_set") if k in meta})
        try:
            names = json.loads(meta["class_names"])
            if isinstance(names, list) and all(isinstance(n, str) for n in names):
                info.class_names = names
        except (KeyError, ValueError):
            pass
        try:
            t = json.loads(meta["eval_transform"])
            info.transform = EvalTransform(**{**t, "mean": tuple(t["mean"]), "std": tuple(t["std"])})
        except (KeyError, ValueError, TypeError):
            pass
        return info

    def eval_settings(self, num_classes: int) -> tuple[list[str], EvalTransform]:
        """Class names and evaluation transform to use: the recorded ones, else ImageNet's for 1000 classes,
        ``class i`` names and torchvision's 256/224 transform otherwise."""
        names = self.class_names if self.class_names and len(self.class_names) == num_classes else (
            list(imagenet_categories()) if num_classes == 1000 else [f"class {i}" for i in range(num_classes)])
        return names, self.transform or EvalTransform()


def weights_info(w: Weights, sha256: str | None = None) -> WeightsInfo:
    """The :class:`WeightsInfo` a registry entry gives its converted file."""
    return WeightsInfo(list(w.categories), w.transforms, w.url, sha256, f"{ENUM_NAMES[w.arch]}.{w.name}")
