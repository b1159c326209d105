"""The torch side of conversion: Flax -> PyTorch state dicts, and checking a converted model against the
torchvision (or timm) model it reproduces. Everything here imports torch; reading checkpoints does not
(:mod:`resnet_flax.loading`)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_flax.atomic import atomic_write
from resnet_flax.errors import WeightsError
from resnet_flax.io import flat_state
from resnet_flax.loading import Checkpoint, describe
from resnet_flax.mapping import flax_to_torch, torch_order
from resnet_flax.model import ResNet, ResNetConfig

TORCH_EXTRA = "pip install 'resnet-flax[torch]'"


def require_torch(purpose: str):
    """Import torch, or raise one line naming the ``[torch]`` extra (only --verify and writing .pth need it)."""
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{purpose} needs PyTorch, which is not installed; {TORCH_EXTRA}") from None
    return torch


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


_TIMM_OUTPUT_STRIDE = {(False, False, False): 32, (False, False, True): 16, (False, True, True): 8}


def require_reference(config: ResNetConfig) -> None:
    """Raise one line if the PyTorch model that ``config`` reproduces cannot be built here (timm missing)."""
    if not config.timm_options:
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
    return timm_model(config) if config.timm_options else torchvision_model(config)


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


def save_torch(model: ResNet, path: str | Path, *, exclusive: bool = False) -> Path:
    """Write ``model`` as a torchvision state dict with torch.save (atomically; never replacing if ``exclusive``)."""
    import torch

    sd = to_torch_state_dict(model)
    return atomic_write(path, lambda tmp: torch.save(sd, tmp), exclusive=exclusive)
