"""The conversion API: PyTorch file or state dict -> Flax model, Flax model -> PyTorch state dict."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import resnet_flax
from convert.mapping import flax_to_torch, infer_config, normalize_state_dict, torch_order, torch_to_flax
from convert.reader import detect_format, read_source
from resnet_flax.atomic import atomic_write
from resnet_flax.errors import WeightsError
from resnet_flax.io import abstract_model, flat_state, load_flat_state
from resnet_flax.layers import Dtype
from resnet_flax.model import ARCHS, ResNet, ResNetConfig, arch_config, arch_name, structure
from resnet_flax.weights import EvalTransform, WeightsInfo

FLAX_SUFFIX = resnet_flax.io.SUFFIX


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
                    replace_stride_with_dilation: tuple[bool, bool, bool] | None = None) -> Checkpoint:
    """Map a PyTorch ResNet state dict (tensors or arrays, any common spelling) to Flax arrays.

    A state dict without ``fc`` (timm ``num_classes=0``, a segmentation backbone) gives a headless model
    (``num_classes=0``: features and stages only)."""
    sd = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)).copy() for k, v in sd.items()}
    sd = normalize_state_dict(sd)
    config = dataclasses.replace(infer_config(sd), replace_stride_with_dilation=tuple(
        replace_stride_with_dilation or (False, False, False)))
    check_arch(config, arch)
    return Checkpoint(config, torch_to_flax(sd, variable_shapes(config)), sd)


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SEGMENTATION_DILATION = (False, True, True)  # torchvision's FCN / DeepLabV3 backbones


def read_checkpoint(path: str | Path, *, arch: str | None = None,
                    replace_stride_with_dilation: tuple[bool, bool, bool] | None = None,
                    allow_nonfinite: bool = False, weights_set: str = "auto") -> Checkpoint:
    """Read a ResNet checkpoint and map it to Flax: .pth/.pt (torch.save), TorchScript, .safetensors, a timm
    training checkpoint (``weights_set``: "auto" takes EMA weights when present, as timm does; "ema"; "model"),
    a Hugging Face transformers or timm hub folder (``config.json`` beside the weights), a segmentation model
    (its ``backbone.``; dilation 0,1,1 unless given).

    No torch needed; NaN/inf tensors are refused unless ``allow_nonfinite``. ``Checkpoint.notes`` says which
    choices were made, ``Checkpoint.info`` what the files say about classes and preprocessing."""
    from convert import formats

    path = Path(path)
    if path.is_dir():
        found = next((path / n for n in HF_WEIGHT_FILES if (path / n).is_file()), None)
        if found is None:
            raise WeightsError(f"{path}: a folder, not a file (and no {' or '.join(HF_WEIGHT_FILES)} in it); "
                               "pass a checkpoint file")
        path = found
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
    sd, left_out, segmentation = formats.split_backbone(sd)
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
        model = resnet_flax.load(path, dtype=dtype, replace_stride_with_dilation=replace_stride_with_dilation)
        check_arch(model.config, arch)
        return model
    return build_model(read_checkpoint(path, arch=arch, replace_stride_with_dilation=replace_stride_with_dilation),
                       dtype)


def load_with_info(path: str | Path, *, arch: str | None = None, dtype: Dtype = jnp.float32
                   ) -> tuple[ResNet, WeightsInfo]:
    """:func:`load_model` plus what the file says about its classes, evaluation transform and source."""
    path = Path(path)
    if path.is_file() and detect_format(path) == "flax":
        return load_model(path, arch=arch, dtype=dtype), WeightsInfo.from_metadata(resnet_flax.io.read_metadata(path))
    ckpt = read_checkpoint(path, arch=arch)
    return build_model(ckpt, dtype), ckpt.info


def eval_settings(path: str | Path, num_classes: int | None = None) -> tuple[list[str], EvalTransform]:
    """Class names and evaluation transform for a weights file: what it records, else ImageNet's names for
    1000 classes and torchvision's resize 256 / crop 224 (used by ``train.predict`` and ``--eval-only``)."""
    path = Path(path)
    if path.is_file() and detect_format(path) == "flax":
        meta = resnet_flax.io.read_metadata(path)
        info, n = WeightsInfo.from_metadata(meta), resnet_flax.io.header_config(meta, 1 << 30, path).num_classes
    else:
        ckpt = read_checkpoint(path)
        info, n = ckpt.info, ckpt.config.num_classes
    return info.eval_settings(n if num_classes is None else num_classes)


def to_torch_state_dict(model: ResNet) -> OrderedDict[str, Any]:
    """The model's weights as a PyTorch state dict with torchvision's (timm's, for its options) names and order
    (``load_state_dict(sd, strict=True)`` accepts it)."""
    import torch

    arrays = flax_to_torch(flat_state(model))
    sd = OrderedDict()
    for k in torch_order(arrays):
        t = torch.from_numpy(np.array(arrays[k], order="C"))
        sd[k] = t.to(torch.int64) if k.endswith("num_batches_tracked") else t.to(torch.float32)
    return sd


def torchvision_model(config: ResNetConfig):
    """An untrained torchvision model of ``config``'s structure (for verification)."""
    import torch
    from torchvision.models import resnet as tvr

    block = tvr.BasicBlock if config.block == "basic" else tvr.Bottleneck
    model = tvr.ResNet(block, list(config.layers), num_classes=config.num_classes, groups=config.groups,
                       width_per_group=config.width_per_group,
                       replace_stride_with_dilation=list(config.replace_stride_with_dilation))
    if config.num_classes == 0:
        model.fc = torch.nn.Identity()  # headless: the pooled features, as timm's num_classes=0
    if config.in_channels != 3:
        model.conv1 = torch.nn.Conv2d(config.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def is_timm_variant(config: ResNetConfig) -> bool:
    """True if ``config`` uses a timm option (deep stem, avg-pool shortcuts, SE): torchvision cannot run it."""
    return bool(config.stem_type or config.avg_down or config.se)


_TIMM_OUTPUT_STRIDE = {(False, False, False): 32, (False, False, True): 16, (False, True, True): 8}


def require_reference(config: ResNetConfig) -> None:
    """Raise one line if the PyTorch model that ``config`` reproduces cannot be built here (timm missing)."""
    if not is_timm_variant(config):
        return
    try:
        import timm  # noqa: F401
    except ImportError:
        raise WeightsError(f"checking a {describe(config)} runs timm, which is not installed; "
                           "pip install timm") from None
    if config.replace_stride_with_dilation not in _TIMM_OUTPUT_STRIDE:
        raise WeightsError(f"timm cannot dilate layer2..4 as {config.replace_stride_with_dilation} "
                           "(only 0,0,1 and 0,1,1); drop --verify")


def timm_model(config: ResNetConfig):
    """An untrained timm ResNet of ``config``'s structure (for verifying its deep stem, avg_down and SE options)."""
    require_reference(config)
    from timm.models import resnet as tr

    return tr.ResNet(tr.BasicBlock if config.block == "basic" else tr.Bottleneck, list(config.layers),
                     num_classes=config.num_classes, in_chans=config.in_channels,
                     output_stride=_TIMM_OUTPUT_STRIDE[config.replace_stride_with_dilation],
                     cardinality=config.groups, base_width=config.width_per_group, stem_type=config.stem_type,
                     stem_width=config.stem_width, avg_down=config.avg_down,
                     block_args={"attn_layer": "se"} if config.se else None)


def reference_model(config: ResNetConfig):
    """The PyTorch model ``config`` reproduces: torchvision's, or timm's when a timm option is set."""
    return timm_model(config) if is_timm_variant(config) else torchvision_model(config)


def compare_outputs(ckpt: Checkpoint, model: ResNet, *, size: int = 224, batch: int = 2,
                    seed: int = 0) -> tuple[float, float]:
    """Run torchvision or timm (with the original tensors) and the Flax model on one random batch, in eval mode.

    Returns (max |diff|, max |diff| / max |torch logits|) of the logits, at full float32 precision.
    """
    import torch

    tmodel = reference_model(ckpt.config)
    tsd = {k: torch.from_numpy(np.array(v)) for k, v in ckpt.torch_state.items()}
    result = tmodel.load_state_dict(tsd, strict=False)
    leftover = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")] + result.unexpected_keys
    if leftover:
        raise WeightsError(f"the PyTorch model rejected keys: {leftover[:5]}")
    tmodel.eval()
    x = np.random.default_rng(seed).standard_normal((batch, ckpt.config.in_channels, size, size), np.float32)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # full float32 on GPUs
    try:
        with torch.no_grad():
            ref = tmodel(torch.from_numpy(x)).numpy()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    with jax.default_matmul_precision("highest"):
        out = np.asarray(model(jnp.asarray(x.transpose(0, 2, 3, 1))))
    diff = float(np.max(np.abs(out - ref)))
    return diff, diff / float(np.max(np.abs(ref)))


def default_output(src: Path, to_flax: bool) -> Path:
    """``resnet18.pth`` -> ``resnet18.flax.safetensors``; ``x.flax.safetensors`` -> ``x.pth``."""
    name = src.name
    if to_flax:
        for suffix in (".pth.tar", ".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".tar"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        return src.with_name(name + FLAX_SUFFIX)
    name = name[: -len(FLAX_SUFFIX)] if name.endswith(FLAX_SUFFIX) else src.stem
    return src.with_name(name + ".pth")


def save_torch(model: ResNet, path: str | Path, *, exclusive: bool = False) -> Path:
    """Write ``model`` as a torchvision state dict with torch.save (atomically; never replacing if ``exclusive``)."""
    import torch

    sd = to_torch_state_dict(model)
    return atomic_write(path, lambda tmp: torch.save(sd, tmp), exclusive=exclusive)
