"""torchvision's automatic augmentations on PIL images (TrivialAugmentWide, RandAugment, AutoAugment) and
RandomErasing's boxes, as ``presets.ClassificationPresetTrain`` of torchvision's reference scripts uses them.

Each op is ``torchvision.transforms.functional``'s on a PIL image: the same PIL calls with the same affine
matrices and fill. Each policy makes torchvision's random draws in torchvision's order (op index, magnitude bin,
sign; AutoAugment: sub-policy, two probabilities, two signs) from an explicit sampler (a per-example
``numpy.random.Generator`` in the loaders), so the same draws give the same pixels. Magnitude tables are computed
as ``torch.linspace`` computes them in float32 (one fused multiply-add per element): TrivialAugmentWide's
translation by "16" pixels is 15.999999, which torchvision truncates to 15.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from train.config import TrainConfig
from train.transforms import RESAMPLE, UniformSampler

POLICIES = ("ta_wide", "ra", "imagenet", "cifar10", "svhn")  # the reference's --auto-augment names (augmix: none)
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)

# AutoAugment's learned sub-policies (Cubuk et al. 2019) as torchvision lists them: "op probability bin" pairs.
_AUTO_AUGMENT = {
    "imagenet": """
        Posterize .4 8, Rotate .6 9; Solarize .6 5, AutoContrast .6 -; Equalize .8 -, Equalize .6 -;
        Posterize .6 7, Posterize .6 6; Equalize .4 -, Solarize .2 4; Equalize .4 -, Rotate .8 8;
        Solarize .6 3, Equalize .6 -; Posterize .8 5, Equalize 1 -; Rotate .2 3, Solarize .6 8;
        Equalize .6 -, Posterize .4 6; Rotate .8 8, Color .4 0; Rotate .4 9, Equalize .6 -;
        Equalize 0 -, Equalize .8 -; Invert .6 -, Equalize 1 -; Color .6 4, Contrast 1 8;
        Rotate .8 8, Color 1 2; Color .8 8, Solarize .8 7; Sharpness .4 7, Invert .6 -;
        ShearX .6 5, Equalize 1 -; Color .4 0, Equalize .6 -; Equalize .4 -, Solarize .2 4;
        Solarize .6 5, AutoContrast .6 -; Invert .6 -, Equalize 1 -; Color .6 4, Contrast 1 8;
        Equalize .8 -, Equalize .6 -""",
    "cifar10": """
        Invert .1 -, Contrast .2 6; Rotate .7 2, TranslateX .3 9; Sharpness .8 1, Sharpness .9 3;
        ShearY .5 8, TranslateY .7 9; AutoContrast .5 -, Equalize .9 -; ShearY .2 7, Posterize .3 7;
        Color .4 3, Brightness .6 7; Sharpness .3 9, Brightness .7 9; Equalize .6 -, Equalize .5 -;
        Contrast .6 7, Sharpness .6 5; Color .7 7, TranslateX .5 8; Equalize .3 -, AutoContrast .4 -;
        TranslateY .4 3, Sharpness .2 6; Brightness .9 6, Color .2 8; Solarize .5 2, Invert 0 -;
        Equalize .2 -, AutoContrast .6 -; Equalize .2 -, Equalize .6 -; Color .9 9, Equalize .6 -;
        AutoContrast .8 -, Solarize .2 8; Brightness .1 3, Color .7 0; Solarize .4 5, AutoContrast .9 -;
        TranslateY .9 9, TranslateY .7 9; AutoContrast .9 -, Solarize .8 3; Equalize .8 -, Invert .1 -;
        TranslateY .7 9, AutoContrast .9 -""",
    "svhn": """
        ShearX .9 4, Invert .2 -; ShearY .9 8, Invert .7 -; Equalize .6 -, Solarize .6 6;
        Invert .9 -, Equalize .6 -; Equalize .6 -, Rotate .9 3; ShearX .9 4, AutoContrast .8 -;
        ShearY .9 8, Invert .4 -; ShearY .9 5, Solarize .2 6; Invert .9 -, AutoContrast .8 -;
        Equalize .6 -, Rotate .9 3; ShearX .9 4, Solarize .3 3; ShearY .8 8, Invert .7 -;
        Equalize .9 -, TranslateY .6 6; Invert .9 -, Equalize .6 -; Contrast .3 3, Rotate .8 4;
        Invert .8 -, TranslateY 0 2; ShearY .7 6, Solarize .4 8; Invert .6 -, Rotate .8 4;
        ShearY .3 7, TranslateX .9 3; ShearX .1 6, Invert .6 -; Solarize .7 2, TranslateY .6 7;
        ShearY .8 4, Invert .8 -; ShearX .7 9, TranslateY .8 3; ShearY .8 5, AutoContrast .7 -;
        ShearX .7 2, Invert .1 -""",
}

SubPolicy = tuple[tuple[str, float, int | None], ...]


def _parse_policy(text: str) -> list[SubPolicy]:
    """``"Op p bin, Op p bin; ..."`` -> [((op, p, bin or None), (op, p, bin or None)), ...]."""
    def op(spec: str) -> tuple[str, float, int | None]:
        name, p, level = spec.split()
        return name, float(p), None if level == "-" else int(level)

    return [tuple(op(s) for s in sub.split(",")) for sub in text.split(";")]


AUTO_AUGMENT_POLICIES: dict[str, list[SubPolicy]] = {k: _parse_policy(v) for k, v in _AUTO_AUGMENT.items()}


def linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32 as torch's CPU kernel computes it, element by element."""
    lo, hi = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([lo], np.float32)
    step = (hi - lo) / np.float32(steps - 1)
    # fma(step, i, lo) from the start, fma(-step, steps - 1 - i, hi) from the end; exact products in float64
    return np.array([float(step) * i + float(lo) if i < steps // 2 else float(-step) * (steps - 1 - i) + float(hi)
                     for i in range(steps)], np.float64).astype(np.float32)


def _posterize_bits(num_bins: int, levels: int) -> np.ndarray:
    """``8 - (arange(num_bins) / ((num_bins - 1) / levels)).round().int()`` (float32, round half to even)."""
    return 8 - np.round(np.arange(num_bins, dtype=np.float32) / np.float32((num_bins - 1) / levels)).astype(np.int64)


def augmentation_space(kind: str, num_bins: int, height: int, width: int) -> dict[str, tuple[np.ndarray | None, bool]]:
    """op name -> (magnitudes or None, signed), in torchvision's order: kind "ta_wide", "ra" or "aa" (AutoAugment)."""
    wide = kind == "ta_wide"
    enhance = linspace32(0.0, 0.99 if wide else 0.9, num_bins)
    space: dict[str, tuple[np.ndarray | None, bool]] = {} if kind == "aa" else {"Identity": (None, False)}
    space |= {
        "ShearX": (linspace32(0.0, 0.99 if wide else 0.3, num_bins), True),
        "ShearY": (linspace32(0.0, 0.99 if wide else 0.3, num_bins), True),
        "TranslateX": (linspace32(0.0, 32.0 if wide else 150.0 / 331.0 * width, num_bins), True),
        "TranslateY": (linspace32(0.0, 32.0 if wide else 150.0 / 331.0 * height, num_bins), True),
        "Rotate": (linspace32(0.0, 135.0 if wide else 30.0, num_bins), True),
        "Brightness": (enhance, True),
        "Color": (enhance, True),
        "Contrast": (enhance, True),
        "Sharpness": (enhance, True),
        "Posterize": (_posterize_bits(num_bins, 6 if wide else 4), False),
        "Solarize": (linspace32(255.0, 0.0, num_bins), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
    }
    if kind == "aa":
        space["Invert"] = (None, False)
    return space


def _inverse_affine(center: Sequence[float], angle: float, translate: Sequence[float], scale: float,
                    shear: Sequence[float]) -> list[float]:
    """PIL's (inverse) matrix for rotate/scale/shear about ``center`` then translate (torchvision's, in degrees)."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    (cx, cy), (tx, ty) = center, translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [x / scale for x in (d, -b, 0.0, -c, a, 0.0)]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
    m[2] += cx
    m[5] += cy
    return m


def apply_op(img: Image.Image, name: str, magnitude: float, interpolation: str = "bilinear") -> Image.Image:
    """One op of the policies, as torchvision's ``_apply_op`` on a PIL image (fill 0 outside the image)."""
    resample = RESAMPLE[interpolation]
    fill = 0 if len(img.getbands()) == 1 else (0,) * len(img.getbands())
    if name in ("ShearX", "ShearY", "TranslateX", "TranslateY"):
        shear = math.degrees(math.atan(magnitude)) if name.startswith("Shear") else 0.0
        if name.startswith("Shear"):
            center, move, shears = [0, 0], [0, 0], [shear, 0.0] if name == "ShearX" else [0.0, shear]
        else:
            center, shears = [img.width * 0.5, img.height * 0.5], [0.0, 0.0]
            move = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        matrix = _inverse_affine(center, 0.0, move, 1.0, shears)
        return img.transform(img.size, Image.AFFINE, matrix, resample, fillcolor=fill)
    if name == "Rotate":
        return img.rotate(magnitude, resample, False, None, fillcolor=fill)
    enhancers = {"Brightness": ImageEnhance.Brightness, "Color": ImageEnhance.Color,
                 "Contrast": ImageEnhance.Contrast, "Sharpness": ImageEnhance.Sharpness}
    if name in enhancers:
        return enhancers[name](img).enhance(1.0 + magnitude)
    if name == "Posterize":
        return ImageOps.posterize(img, int(magnitude))
    if name == "Solarize":
        return ImageOps.solarize(img, magnitude)
    ops = {"AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize, "Invert": ImageOps.invert,
           "Identity": lambda x: x}
    if name in ops:
        return ops[name](img)
    raise ValueError(f"unknown augmentation op {name!r}")


def trivial_augment_wide(img: Image.Image, rng: UniformSampler, num_bins: int = 31,
                         interpolation: str = "bilinear") -> Image.Image:
    """``TrivialAugmentWide``: one op, a random magnitude bin, a random sign (draws in torchvision's order)."""
    space = augmentation_space("ta_wide", num_bins, img.height, img.width)
    name = list(space)[int(rng.integers(0, len(space)))]
    magnitudes, signed = space[name]
    magnitude = float(magnitudes[int(rng.integers(0, len(magnitudes)))]) if magnitudes is not None else 0.0
    if signed and int(rng.integers(0, 2)):
        magnitude = -magnitude
    return apply_op(img, name, magnitude, interpolation)


def rand_augment(img: Image.Image, rng: UniformSampler, magnitude: int = 9, num_ops: int = 2, num_bins: int = 31,
                 interpolation: str = "bilinear") -> Image.Image:
    """``RandAugment``: ``num_ops`` random ops at magnitude bin ``magnitude``, each with a random sign."""
    space = augmentation_space("ra", num_bins, img.height, img.width)
    names = list(space)
    for _ in range(num_ops):
        name = names[int(rng.integers(0, len(names)))]
        magnitudes, signed = space[name]
        value = float(magnitudes[magnitude]) if magnitudes is not None else 0.0
        if signed and int(rng.integers(0, 2)):
            value = -value
        img = apply_op(img, name, value, interpolation)
    return img


def auto_augment(img: Image.Image, rng: UniformSampler, policy: str = "imagenet",
                 interpolation: str = "bilinear") -> Image.Image:
    """``AutoAugment(policy)``: a random sub-policy, each of its two ops applied with its probability."""
    subs = AUTO_AUGMENT_POLICIES[policy]
    chosen = subs[int(rng.integers(0, len(subs)))]
    probs = [np.float32(rng.uniform(0.0, 1.0)) for _ in range(2)]  # torch compares float32 draws to float32(p)
    signs = [int(rng.integers(0, 2)) for _ in range(2)]
    space = augmentation_space("aa", 10, img.height, img.width)
    for (name, p, level), prob, sign in zip(chosen, probs, signs):
        if prob <= np.float32(p):
            magnitudes, signed = space[name]
            magnitude = float(magnitudes[level]) if level is not None else 0.0
            if signed and sign == 0:
                magnitude = -magnitude
            img = apply_op(img, name, magnitude, interpolation)
    return img


def erase_box(height: int, width: int, rng: UniformSampler, p: float, scale: Sequence[float] = ERASE_SCALE,
              ratio: Sequence[float] = ERASE_RATIO) -> tuple[int, int, int, int]:
    """``RandomErasing(p)``'s region (top, left, h, w) with its draws; (0, 0, 0, 0) when nothing is erased."""
    if not np.float32(rng.uniform(0.0, 1.0)) < np.float32(p):
        return 0, 0, 0, 0
    area = height * width
    log_ratio = np.log(np.asarray(ratio, dtype=np.float32))
    for _ in range(10):
        erase_area = area * float(np.float32(rng.uniform(scale[0], scale[1])))
        aspect = float(np.exp(np.float32(rng.uniform(float(log_ratio[0]), float(log_ratio[1])))))
        h = round(math.sqrt(erase_area * aspect))
        w = round(math.sqrt(erase_area / aspect))
        if h < height and w < width:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return 0, 0, 0, 0  # torchvision then "erases" the image with itself


def erase(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """The float HWC image with the (top, left, h, w) region set to 0 (``RandomErasing``'s default value)."""
    top, left, h, w = (int(v) for v in box)
    out = image.copy()
    out[top:top + h, left:left + w] = 0
    return out


@dataclass(frozen=True)
class Augment:
    """The training augmentations after RandomResizedCrop + flip: a policy on the crop, then an erase box."""

    policy: str | None = None  # one of POLICIES
    ra_magnitude: int = 9
    random_erase: float = 0.0
    interpolation: str = "bilinear"  # the reference's default, also used by its crop

    @classmethod
    def for_run(cls, cfg: TrainConfig) -> Augment | None:
        """The run's flags (--auto-augment, --ra-magnitude, --random-erase), or None when all are off."""
        if cfg.auto_augment is None and not cfg.random_erase:
            return None
        return cls(cfg.auto_augment, cfg.ra_magnitude, cfg.random_erase)

    def image(self, pixels: np.ndarray, rng: UniformSampler) -> np.ndarray:
        """The policy applied to a uint8 HWC crop (unchanged, and no draws, without one)."""
        if self.policy is None:
            return pixels
        img = Image.fromarray(pixels)
        if self.policy == "ta_wide":
            img = trivial_augment_wide(img, rng, interpolation=self.interpolation)
        elif self.policy == "ra":
            img = rand_augment(img, rng, self.ra_magnitude, interpolation=self.interpolation)
        else:
            img = auto_augment(img, rng, self.policy, interpolation=self.interpolation)
        return np.asarray(img, dtype=np.uint8)

    def erase_box(self, height: int, width: int, rng: UniformSampler) -> np.ndarray:
        """int32 [top, left, h, w] of the region to zero after normalisation (h = w = 0: none)."""
        return np.asarray(erase_box(height, width, rng, self.random_erase), np.int32)
