"""torchvision's ImageNet preprocessing (RandomResizedCrop/flip and Resize/CenterCrop) in PIL + numpy.

Every step mirrors torchvision 0.19+ on PIL images: the same crop-parameter sampling, the same output-size
rounding, PIL's antialiased BILINEAR resize, and float32 ``ToTensor`` + ``Normalize`` arithmetic, so eval
outputs match torchvision bit for bit (as HWC instead of CHW). Randomness comes from an explicit
``numpy.random.Generator`` so each example's augmentation is reproducible.

The loaders use the uint8 halves (``train_crop``, ``eval_crop``) and normalise on the device
(``train.steps.normalize_images``); ``train_transform``/``eval_transform`` add the float32 normalisation on the
host. ``train_crop`` of a JPEG not yet decoded decodes at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
PIL's ``draft``) when the crop is scaled down at least that much anyway.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from resnet_flax.weights import IMAGENET_MEAN, IMAGENET_STD
from train.storage import read_bytes

DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)

ImageInput = bytes | str | os.PathLike | np.ndarray | Image.Image


class UniformSampler(Protocol):
    """The two draws RandomResizedCrop needs; ``numpy.random.Generator`` satisfies it."""

    def uniform(self, low: float, high: float) -> float: ...

    def integers(self, low: int, high: int) -> int: ...


def default_resize_size(crop_size: int) -> int:
    """Shorter-side resize before the eval centre crop: 256 for 224, scaled the same way for other sizes."""
    return int(crop_size * 256 / 224)


def open_image(data: ImageInput) -> Image.Image:
    """Open encoded bytes, a file path, a uint8 HxWx3/HxW array or a PIL image; not decoded yet (lazy)."""
    if isinstance(data, Image.Image):
        return data
    if isinstance(data, np.ndarray):
        return _array_to_image(data)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return _open_encoded(data)
    return _open_encoded(read_bytes(data))  # a local file or an object at a URL


def _open_encoded(data: bytes | bytearray | memoryview) -> Image.Image:
    """``Image.open`` of in-memory bytes; PIL's "cannot identify" error would name our BytesIO and its address."""
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError("cannot identify image file: not an image format PIL reads") from None


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes for 16-bit grayscale PNG/TIFF


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode ``img`` (if still lazy) and convert it to RGB.

    16-bit grayscale is scaled to 8 bits (round(v / 257), 65535 -> 255); PIL's own conversion, which
    torchvision's loader uses, clips it instead and turns every value above 255 white."""
    img.load()
    if img.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257), 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(data: ImageInput) -> Image.Image:
    """Decode encoded bytes, a file path, a uint8 HxWx3/HxW array or a PIL image into an RGB PIL image."""
    return to_rgb(open_image(data))


def _array_to_image(arr: np.ndarray) -> Image.Image:
    """Wrap a uint8 HxW, HxWx1, HxWx3 or HxWx4 array as a PIL image (like ``ToPILImage``)."""
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr), mode="L")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr), mode="RGB" if arr.shape[-1] == 3 else "RGBA")
    raise ValueError(f"expected an HxW or HxWx{{1,3,4}} image array, got shape {arr.shape}")


def normalize(img: Image.Image | np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """``ToTensor`` + ``Normalize(mean, std)`` (ImageNet's by default) in float32, HWC layout."""
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    return (x - mean) / std


def random_resized_crop_params(
    height: int,
    width: int,
    rng: UniformSampler,
    scale: Sequence[float] = DEFAULT_SCALE,
    ratio: Sequence[float] = DEFAULT_RATIO,
) -> tuple[int, int, int, int]:
    """Sample (top, left, h, w) exactly as ``RandomResizedCrop.get_params`` (10 tries, then centre fallback).

    Draw order is the same as torchvision's: area fraction, log aspect ratio, then top and left offsets.
    The aspect ratio is computed in float32 as torch does.
    """
    area = height * width
    log_ratio = np.log(np.asarray(ratio, dtype=np.float32))
    for _ in range(10):
        target_area = area * float(np.float32(rng.uniform(scale[0], scale[1])))
        log_ar = np.float32(rng.uniform(float(log_ratio[0]), float(log_ratio[1])))
        aspect_ratio = float(np.exp(log_ar))
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return _central_crop_fallback(height, width, ratio)


def _central_crop_fallback(height: int, width: int, ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """torchvision's fallback when no sampled crop fits: the whole image clamped to the ratio range."""
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_output_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) for resizing the shorter side to ``size`` (torchvision ``_compute_resized_output_size``)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w


RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def resize_shorter(img: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """``transforms.Resize(size)`` on a PIL image: shorter side to ``size``, PIL bilinear (antialiased)."""
    new_h, new_w = resized_output_size(img.height, img.width, size)
    if (new_h, new_w) == (img.height, img.width):
        return img
    return img.resize((new_w, new_h), RESAMPLE[interpolation])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """``transforms.CenterCrop(size)`` on a PIL image, zero-padding first when the image is smaller."""
    if size > img.width or size > img.height:
        padded = Image.new(img.mode, (max(size, img.width), max(size, img.height)))
        pad_left = (size - img.width) // 2 if size > img.width else 0
        pad_top = (size - img.height) // 2 if size > img.height else 0
        padded.paste(img, (pad_left, pad_top))
        img = padded
        if img.size == (size, size):
            return img
    top = round((img.height - size) / 2.0)
    left = round((img.width - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def draft_scale(crop_h: int, crop_w: int, size: int) -> int:
    """The largest JPEG DCT scale (1, 2, 4 or 8) that keeps both crop sides at least ``size`` pixels."""
    scale = 8
    while scale > 1 and min(crop_h, crop_w) < scale * size:
        scale //= 2
    return scale


def train_crop(
    img: Image.Image,
    size: int,
    rng: UniformSampler,
    scale: Sequence[float] = DEFAULT_SCALE,
    ratio: Sequence[float] = DEFAULT_RATIO,
    flip_prob: float = 0.5,
) -> np.ndarray:
    """RandomResizedCrop(size) + RandomHorizontalFlip -> uint8 [size, size, 3] (draws as torchvision's).

    The crop is drawn on the full image size; a JPEG not yet decoded whose crop shrinks 2x or more is then
    decoded at the reduced scale (``draft``) and resized from there: the same crop, less to decode, pixels
    within resampling differences of the full decode. Anything else follows torchvision exactly.
    """
    top, left, h, w = random_resized_crop_params(img.height, img.width, rng, scale, ratio)
    reduce = draft_scale(h, w, size) if img.format == "JPEG" and getattr(img, "tile", None) else 1
    if reduce > 1:
        full_w, full_h = img.size
        img.draft("RGB", (full_w // reduce, full_h // reduce))
        img = to_rgb(img)
        sx, sy = img.width / full_w, img.height / full_h
        img = img.resize((size, size), Image.BILINEAR, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
    else:
        img = to_rgb(img).crop((left, top, left + w, top + h))
        if (h, w) != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
    if rng.uniform(0.0, 1.0) < flip_prob:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


def train_transform(
    img: Image.Image,
    size: int,
    rng: UniformSampler,
    scale: Sequence[float] = DEFAULT_SCALE,
    ratio: Sequence[float] = DEFAULT_RATIO,
    flip_prob: float = 0.5,
) -> np.ndarray:
    """RandomResizedCrop(size) + RandomHorizontalFlip + normalise -> float32 [size, size, 3]."""
    return normalize(train_crop(img, size, rng, scale, ratio, flip_prob))


def eval_crop(img: Image.Image, crop_size: int, resize_size: int | None = None,
              interpolation: str = "bilinear") -> np.ndarray:
    """Resize(shorter side) + CenterCrop(crop_size) -> uint8 [crop_size, crop_size, 3] (decoded in full)."""
    resize_size = default_resize_size(crop_size) if resize_size is None else resize_size
    return np.asarray(center_crop(resize_shorter(to_rgb(img), resize_size, interpolation), crop_size), np.uint8)


def eval_transform(img: Image.Image, crop_size: int, resize_size: int | None = None, *,
                   interpolation: str = "bilinear", mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Resize(shorter side) + CenterCrop(crop_size) + normalise -> float32 [crop_size, crop_size, 3]."""
    return normalize(eval_crop(img, crop_size, resize_size, interpolation), mean, std)
