"""Any ResNet checkpoint to a Flax model, torch-free: read, find the ResNet, map names and layouts, build.

:func:`load_model` is the one call; :func:`convert_file` writes the converted file (the command line, the hub
cache and ``python -m convert`` all go through it).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet_flax import formats
from resnet_flax.errors import WeightsError
from resnet_flax.io import SUFFIX, abstract_model, header_config, load, load_flat_state, read_metadata, save
from resnet_flax.layers import Dtype
from resnet_flax.mapping import infer_config, normalize_state_dict, torch_to_flax
from resnet_flax.model import ResNet, ResNetConfig
from resnet_flax.reader import checkpoint_stem, detect_format, read_source, sha256_file, weights_file
from resnet_flax.registry import ARCHS, arch_config, arch_name, structure
from resnet_flax.weights import EvalTransform, WeightsInfo


@dataclasses.dataclass
class Checkpoint:
    """A PyTorch checkpoint read and mapped: its architecture and the Flax arrays."""

    config: ResNetConfig
    arrays: dict[str, np.ndarray]
    torch_state: dict[str, np.ndarray]  # the normalised torchvision-named tensors it came from
    info: WeightsInfo = dataclasses.field(default_factory=WeightsInfo)  # class names, transform, source
    notes: list[str] = dataclasses.field(default_factory=list)  # choices made on the way, one line each

    @property
    def arch(self) -> str:
        return arch_name(self.config) or "custom"

    @property
    def num_params(self) -> int:
        return int(sum(v.size for k, v in self.arrays.items() if not k.endswith(("mean", "var", "tracked"))))


def describe(config: ResNetConfig) -> str:
    """One line naming the architecture, e.g. ``resnet50 (bottleneck blocks [3, 4, 6, 3], groups 1, ...)``."""
    options = [f"{config.stem_type.replace('_', ' ')} stem {'-'.join(map(str, config.stem_channels))}"
               ] if config.stem_type else []
    options += ["avg-pool shortcuts"] * config.avg_down + ["SE"] * config.se
    return (f"{arch_name(config) or 'custom ResNet'} ({config.block} blocks {list(config.layers)}, "
            f"groups {config.groups}, width/group {config.width_per_group}, {''.join(o + ', ' for o in options)}"
            f"{config.num_classes} classes, {config.in_channels} input channels)")


def check_arch(config: ResNetConfig, arch: str | None) -> None:
    """Raise if ``arch`` is unknown or its structure differs from the one the tensors describe."""
    if arch is None:
        return
    if arch not in ARCHS:
        raise WeightsError(f"unknown --arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    if structure(arch_config(arch)) != structure(config):
        raise WeightsError(f"--arch {arch} contradicts the tensors, which describe a {describe(config)}; "
                           "drop --arch or pass the matching name")


def variable_shapes(config: ResNetConfig) -> dict[str, tuple[int, ...]]:
    """Flax key -> shape for every variable of the architecture (computed abstractly, no init cost)."""
    state = nnx.state(abstract_model(config))
    return {".".join(str(p) for p in path): tuple(var.shape) for path, var in nnx.to_flat_state(state)}


def from_state_dict(sd: dict[str, Any], *, arch: str | None = None,
                    replace_stride_with_dilation: tuple[bool, bool, bool] | None = None,
                    prefix: str | None = None) -> Checkpoint:
    """Map a PyTorch ResNet state dict (tensors or arrays, any common spelling) to Flax arrays.

    A state dict without ``fc`` (timm ``num_classes=0``, a segmentation backbone) gives a headless model
    (``num_classes=0``: features and stages only)."""
    sd = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)).copy() for k, v in sd.items()}
    sd = normalize_state_dict(sd, prefix)
    config = dataclasses.replace(infer_config(sd), replace_stride_with_dilation=tuple(
        replace_stride_with_dilation or (False, False, False)))
    check_arch(config, arch)
    return Checkpoint(config, torch_to_flax(sd, variable_shapes(config)), sd)


SEGMENTATION_DILATION = (False, True, True)  # torchvision's FCN / DeepLabV3 backbones


def read_checkpoint(path: str | Path, *, arch: str | None = None,
                    replace_stride_with_dilation: tuple[bool, bool, bool] | None = None,
                    allow_nonfinite: bool = False, weights_set: str = "auto", prefix: str | None = None
                    ) -> Checkpoint:
    """Read a ResNet checkpoint and map it to Flax: .pth/.pt (torch.save), TorchScript, .safetensors, a timm
    training checkpoint (``weights_set``: "auto" takes EMA weights when present, as timm does; "ema"; "model"),
    a Hugging Face transformers or timm hub folder (``config.json`` beside the weights), a ResNet inside a bigger
    model (found by structure: ``backbone.``, ``encoder.``; ``prefix`` picks one when several qualify), a
    torchvision segmentation model (dilation 0,1,1 unless given).

    No torch needed; NaN/inf tensors are refused unless ``allow_nonfinite``. ``Checkpoint.notes`` says which
    choices were made, ``Checkpoint.info`` what the files say about classes and preprocessing."""
    path = weights_file(path)
    sd, info, notes = read_source(path, weights_set=weights_set, allow_nonfinite=allow_nonfinite)
    config_json = formats.read_json_beside(path, "config.json")
    if formats.is_transformers_resnet(sd):
        if config_json is None:
            raise WeightsError(f"{path}: a Hugging Face transformers ResNet without its config.json beside it; "
                               "it alone tells ResNet v1.5 from v1 (downsample_in_bottleneck): put it next to the file")
        sd = formats.from_transformers(sd, config_json, path.parent / "config.json")
        info = _merge(info, formats.transformers_info(config_json, formats.read_json_beside(
            path, "preprocessor_config.json")))
        notes.append("read a Hugging Face transformers ResNet (config.json checked: ResNet v1.5, relu)")
    elif config_json is not None and "pretrained_cfg" in config_json:
        info = _merge(info, formats.timm_info(config_json))
    sd, left_out, segmentation = formats.split_backbone(sd, prefix)
    notes += left_out
    if segmentation and replace_stride_with_dilation is None:
        replace_stride_with_dilation = SEGMENTATION_DILATION
        notes.append("a torchvision segmentation model: its backbone runs with replace_stride_with_dilation "
                     "0,1,1 (as FCN/DeepLabV3 build it); pass --dilation to change")
    ckpt = from_state_dict(sd, arch=arch, replace_stride_with_dilation=replace_stride_with_dilation)
    if ckpt.config.num_classes == 0:
        notes.append("no classifier (fc): a headless model, features and stages only (num_classes=0)")
    ckpt.info, ckpt.notes = info, notes
    if ckpt.info.class_names is not None and len(ckpt.info.class_names) != ckpt.config.num_classes:
        ckpt.info.class_names = None  # names for another head: not these weights'
    return ckpt


def _merge(a: WeightsInfo, b: WeightsInfo) -> WeightsInfo:
    """``a`` with its unknown fields taken from ``b``."""
    return dataclasses.replace(a, **{f.name: getattr(b, f.name) for f in dataclasses.fields(a)
                                     if getattr(a, f.name) is None and getattr(b, f.name) is not None})


def build_model(ckpt: Checkpoint, dtype: Dtype = jnp.float32) -> ResNet:
    """A ready-to-run (eval mode) Flax model holding ``ckpt``'s weights."""
    model = load_flat_state(abstract_model(ckpt.config, dtype), ckpt.arrays)
    model.eval()
    return model


def load_model(path: str | Path, *, arch: str | None = None, dtype: Dtype = jnp.float32,
               replace_stride_with_dilation: tuple[bool, bool, bool] | None = None) -> ResNet:
    """One call from a file to a Flax model: a PyTorch checkpoint (.pth, TorchScript, .safetensors; see
    :func:`read_checkpoint`) or a converted ``.flax.safetensors`` file. The model is in eval mode."""
    path = Path(path)
    if path.is_file() and detect_format(path) == "flax":
        model = load(path, dtype=dtype, replace_stride_with_dilation=replace_stride_with_dilation)
        check_arch(model.config, arch)
        return model
    return build_model(read_checkpoint(path, arch=arch, replace_stride_with_dilation=replace_stride_with_dilation),
                       dtype)


def load_with_info(path: str | Path, *, arch: str | None = None, dtype: Dtype = jnp.float32
                   ) -> tuple[ResNet, WeightsInfo]:
    """:func:`load_model` plus what the file says about its classes, evaluation transform and source."""
    path = Path(path)
    if path.is_file() and detect_format(path) == "flax":
        return load_model(path, arch=arch, dtype=dtype), WeightsInfo.from_metadata(read_metadata(path))
    ckpt = read_checkpoint(path, arch=arch)
    return build_model(ckpt, dtype), ckpt.info


def eval_settings(path: str | Path, num_classes: int | None = None) -> tuple[list[str], EvalTransform]:
    """Class names and evaluation transform for a weights file: what it records, else ImageNet's names for
    1000 classes and torchvision's resize 256 / crop 224 (used by ``train.predict`` and ``--eval-only``)."""
    path = Path(path)
    if path.is_file() and detect_format(path) == "flax":
        meta = read_metadata(path)
        info, n = WeightsInfo.from_metadata(meta), header_config(meta, 1 << 30, path).num_classes
    else:
        ckpt = read_checkpoint(path)
        info, n = ckpt.info, ckpt.config.num_classes
    return info.eval_settings(n if num_classes is None else num_classes)


def convert_file(src: str | os.PathLike, out: str | os.PathLike, *, arch: str | None = None,
                 replace_stride_with_dilation: tuple[bool, bool, bool] | None = None, allow_nonfinite: bool = False,
                 weights_set: str = "auto", prefix: str | None = None, info: WeightsInfo | None = None,
                 exclusive: bool = False) -> tuple[Checkpoint, ResNet]:
    """Read the checkpoint ``src`` (:func:`read_checkpoint`) and save its model to ``out`` (:func:`save_converted`)."""
    ckpt = read_checkpoint(src, arch=arch, replace_stride_with_dilation=replace_stride_with_dilation,
                           allow_nonfinite=allow_nonfinite, weights_set=weights_set, prefix=prefix)
    model = build_model(ckpt)
    save_converted(ckpt, model, src, out, info=info, exclusive=exclusive)
    return ckpt, model


def save_converted(ckpt: Checkpoint, model: ResNet, src: str | os.PathLike, out: str | os.PathLike, *,
                   info: WeightsInfo | None = None, exclusive: bool = False) -> None:
    """Save ``ckpt``'s built ``model`` to ``out`` with what is known of the weights.

    ``info`` adds to (and overrides) what the file itself records; the source and its sha256 default to
    ``src``'s own (written atomically; never replacing ``out`` if ``exclusive``)."""
    given = {f.name: getattr(info, f.name) for f in dataclasses.fields(WeightsInfo)
             if info is not None and getattr(info, f.name) is not None}
    ckpt.info = dataclasses.replace(ckpt.info, **given)
    if ckpt.info.source is None:
        ckpt.info.source = str(Path(src).resolve())
    if ckpt.info.sha256 is None:
        ckpt.info.sha256 = sha256_file(weights_file(src))
    save(model, out, extra_metadata={"arch": ckpt.arch, **ckpt.info.to_metadata()}, exclusive=exclusive)


def default_output(src: Path, to_flax: bool) -> Path:
    """``resnet18.pth`` -> ``resnet18.flax.safetensors``; ``x.flax.safetensors`` -> ``x.pth``."""
    if to_flax:
        return src.with_name(checkpoint_stem(src.name) + SUFFIX)
    name = src.name[: -len(SUFFIX)] if src.name.endswith(SUFFIX) else src.stem
    return src.with_name(name + ".pth")
