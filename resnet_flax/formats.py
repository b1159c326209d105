"""The checkpoint layouts other libraries write, brought to torchvision's state dict: timm training checkpoints
(EMA or not), Hugging Face transformers ResNets, headless backbones and segmentation models; and the metadata
(class names, eval transform) that such files or their ``config.json`` carry.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from resnet_flax.errors import WeightsError
from resnet_flax.mapping import find_resnet, normalize_key, resnet_prefixes
from resnet_flax.weights import EvalTransform, WeightsInfo

WEIGHTS_SETS = ("auto", "ema", "model")
# timm's load_checkpoint(use_ema=True) order; the second tuple is what ``--weights-set model`` takes.
EMA_KEYS = ("state_dict_ema", "model_ema")
MODEL_KEYS = ("state_dict", "model")


def select_weights_set(obj: dict, weights_set: str, source: object) -> tuple[Any, str | None, str | None]:
    """From a training checkpoint holding model and EMA weights, the set timm's loader would take ("auto": EMA),
    or the one asked for. Returns (inner object, "ema"/"model"/None, a note saying which, or None)."""
    ema = next((k for k in EMA_KEYS if isinstance(obj.get(k), dict) and obj[k]), None)
    plain = next((k for k in MODEL_KEYS if isinstance(obj.get(k), dict)), None)
    if weights_set == "ema" and ema is None:
        raise WeightsError(f"{source}: --weights-set ema, but the checkpoint holds no EMA weights "
                           f"(no {' / '.join(EMA_KEYS)}); drop the flag")
    if ema is None:
        return obj, None, None
    if weights_set == "model":
        if plain is None:
            raise WeightsError(f"{source}: --weights-set model, but the checkpoint holds only EMA weights ({ema})")
        return obj[plain], "model", f"used the model weights ({plain!r}), not the EMA ones ({ema!r}) beside them"
    other = f"; --weights-set model takes {plain!r}" if plain else ""
    return obj[ema], "ema", f"used the EMA weights ({ema!r}), as timm's load_checkpoint does{other}"


# --- metadata carried inside checkpoint dicts ----------------------------------------------------------------

_NAME_KEYS = ("class_names", "classes", "categories", "labels", "label_names")


def checkpoint_info(obj: Any) -> WeightsInfo:
    """Class names, mean/std and image size stored by training scripts (top level, ``args``, ``hyper_parameters``)."""
    info = WeightsInfo()
    if not isinstance(obj, dict):
        return info
    places = [obj]
    for key in ("args", "hyper_parameters", "hparams", "config", "cfg"):
        inner = obj.get(key)
        if isinstance(inner, dict):
            places.append(inner)
        elif hasattr(inner, "__dict__"):
            places.append(vars(inner))

    def find(*keys):
        for place in places:
            for k in keys:
                if place.get(k) is not None:
                    return place[k]
        return None

    names = find(*_NAME_KEYS)
    if isinstance(names, dict):  # {index: name} or {name: index}
        names = _names_from_mapping(names)
    if isinstance(names, list | tuple) and names and all(isinstance(n, str) for n in names):
        info.class_names = list(names)
    mean, std = find("mean", "image_mean"), find("std", "image_std")
    size = find("crop_size", "image_size", "img_size", "input_size")
    if isinstance(size, list | tuple) and size:
        size = size[-1]
    crop_pct = find("crop_pct")
    if any(v is not None for v in (mean, std, size)):
        t = EvalTransform()
        try:
            crop = int(size) if size is not None else t.crop_size
            resize = find("resize_size")
            resize = int(resize) if resize is not None else (
                math.floor(crop / float(crop_pct)) if crop_pct else int(crop * 256 / 224))
            info.transform = EvalTransform(
                crop, resize, str(find("interpolation") or t.interpolation),
                _triple(mean) or t.mean, _triple(std) or t.std)
        except (TypeError, ValueError):
            pass
    idx = find("idx_to_class", "class_to_idx")
    if info.class_names is None and isinstance(idx, dict):
        info.class_names = _names_from_mapping(idx)
    return info


def _triple(v) -> tuple[float, float, float] | None:
    try:
        t = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    return t if len(t) == 3 else None


def _names_from_mapping(m: dict) -> list[str] | None:
    items = list(m.items())
    if all(isinstance(v, int) for _, v in items) and all(isinstance(k, str) for k, _ in items):
        items = [(v, k) for k, v in items]
    try:
        by_index = {int(k): v for k, v in items}
    except (TypeError, ValueError):
        return None
    if sorted(by_index) != list(range(len(by_index))) or not all(isinstance(v, str) for v in by_index.values()):
        return None
    return [by_index[i] for i in range(len(by_index))]


# --- the part of a bigger model that is the ResNet -----------------------------------------------------------

def split_backbone(sd: dict[str, np.ndarray], prefix: str | None = None
                   ) -> tuple[dict[str, np.ndarray], list[str], bool]:
    """The tensors under the prefix that holds a complete ResNet (``backbone.``, ``encoder.``; ``prefix`` picks
    one when several do), the rest named and left out.

    Returns (kept state dict, notes, looks like a torchvision segmentation model)."""
    normalized = {normalize_key(k): v for k, v in sd.items()}
    if prefix is None and len(resnet_prefixes(normalized)) != 1:
        return sd, [], False  # none or several: normalize_state_dict names them in its error
    prefix = find_resnet(normalized, prefix)
    if not prefix:
        return sd, [], False
    kept = {k: v for k, v in sd.items() if normalize_key(k).startswith(prefix)}
    left = [k for k in sd if k not in kept]
    if not left:
        return sd, [], False
    groups = Counter(".".join(k.split(".")[:2]) if k.count(".") > 1 else k.split(".")[0] for k in left)
    what = ", ".join(f"{g}.* ({n})" for g, n in sorted(groups.items()))
    segmentation = prefix == "backbone." and any(k.startswith("classifier.") for k in left) \
        and not any(normalize_key(k) == "backbone.fc.weight" for k in kept)
    return kept, [f"took the ResNet under {prefix!r}; left out {len(left)} tensor(s): {what}"], segmentation


# --- Hugging Face transformers ResNet ------------------------------------------------------------------------

_HF_STEM = "embedder.embedder.convolution.weight"
_HF_LAYER = re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(?:layer\.(\d+)|(shortcut))\."
                       r"(convolution|normalization)\.(.*)$")


def is_transformers_resnet(sd: dict) -> bool:
    return any(k.endswith(_HF_STEM) for k in sd)


def transformers_key(key: str) -> str:
    """``encoder.stages.0.layers.1.layer.2.convolution.weight`` -> ``layer1.1.conv3.weight`` (others kept)."""
    if key.startswith("embedder.embedder."):
        rest = key.removeprefix("embedder.embedder.")
        return ("conv1." if rest.startswith("convolution.") else "bn1.") + rest.split(".", 1)[1]
    if key.startswith("classifier.1."):
        return "fc." + key.removeprefix("classifier.1.")
    m = _HF_LAYER.match(key)
    if not m:
        return key
    stage, block, i, shortcut, kind, leaf = m.groups()
    if shortcut:
        name = "downsample.0" if kind == "convolution" else "downsample.1"
    else:
        name = ("conv" if kind == "convolution" else "bn") + str(int(i) + 1)
    return f"layer{int(stage) + 1}.{block}.{name}.{leaf}"


def from_transformers(sd: dict[str, np.ndarray], config: dict, source: object) -> dict[str, np.ndarray]:
    """A transformers ``ResNetForImageClassification`` / ``ResNetModel`` state dict in torchvision's names,
    after checking that ``config`` describes a network torchvision's structure computes."""
    check_transformers_config(config, source)
    prefix = next(k for k in sd if k.endswith(_HF_STEM))[: -len(_HF_STEM)]
    return {transformers_key(k.removeprefix(prefix)): v for k, v in sd.items()}


def check_transformers_config(config: dict, source: object) -> None:
    """Refuse settings with which the same tensors compute something else than torchvision's ResNet."""
    bad = []
    if config.get("model_type") != "resnet":
        bad.append(f"model_type {config.get('model_type')!r} (expected 'resnet')")
    if config.get("downsample_in_bottleneck", False):
        bad.append("downsample_in_bottleneck=True (stride on the first 1x1 conv, ResNet v1: same tensors, "
                   "different outputs)")
    if config.get("downsample_in_first_stage", False):
        bad.append("downsample_in_first_stage=True (layer1 strided)")
    if config.get("hidden_act", "relu") != "relu":
        bad.append(f"hidden_act={config.get('hidden_act')!r}")
    if config.get("embedding_size", 64) != 64:
        bad.append(f"embedding_size={config.get('embedding_size')}")
    if config.get("layer_type", "bottleneck") not in ("basic", "bottleneck"):
        bad.append(f"layer_type={config.get('layer_type')!r}")
    if bad:
        raise WeightsError(f"{source}: config.json sets {'; '.join(bad)}, which torchvision's ResNet cannot "
                           "compute; not converted")


def transformers_info(config: dict, preprocessor: dict | None) -> WeightsInfo:
    """Class names (``id2label``) and the eval transform of ``preprocessor_config.json`` (ConvNext processor)."""
    info = WeightsInfo()
    labels = config.get("id2label")
    if isinstance(labels, dict):
        names = _names_from_mapping(labels)
        if names and not all(re.fullmatch(r"LABEL_\d+", n) for n in names):
            info.class_names = names
    if preprocessor:
        size = preprocessor.get("size", {})
        short = size.get("shortest_edge") if isinstance(size, dict) else size
        crop_pct = preprocessor.get("crop_pct") or 224 / 256
        if isinstance(short, int):
            resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(preprocessor.get("resample"), "bilinear")
            info.transform = EvalTransform(
                short, int(short / crop_pct) if short < 384 else short, resample,
                _triple(preprocessor.get("image_mean")) or EvalTransform.mean,
                _triple(preprocessor.get("image_std")) or EvalTransform.std)
    return info


def timm_info(config: dict) -> WeightsInfo:
    """What a timm hub ``config.json`` (``pretrained_cfg``) says: eval size, crop_pct, interpolation, mean/std."""
    cfg = config.get("pretrained_cfg") or {}
    info = WeightsInfo()
    size = cfg.get("input_size")
    if isinstance(size, list) and len(size) == 3:
        crop = int(size[-1])
        crop_pct = float(cfg.get("crop_pct") or 0.875)
        info.transform = EvalTransform(crop, math.floor(crop / crop_pct), str(cfg.get("interpolation") or "bilinear"),
                                       _triple(cfg.get("mean")) or EvalTransform.mean,
                                       _triple(cfg.get("std")) or EvalTransform.std)
    names = config.get("label_names") or cfg.get("label_names")
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        info.class_names = names
    return info


def read_json_beside(path: Path, name: str) -> dict | None:
    """``name`` in ``path``'s folder, parsed; None if absent; one line if unreadable."""
    p = path.parent / name
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{p}: unreadable JSON ({e}); fix or remove it") from None
    return d if isinstance(d, dict) else None
