"""Every architecture by name: ``@register_model`` records a factory's structure and source, as timm's registry
does; :func:`create_model`, :func:`list_models` and the converter's name lookup all read this one table."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import nnx

from resnet_flax.layers import Dtype
from resnet_flax.model import ResNet, ResNetConfig

# name -> structure (1000 classes, 3 input channels, no dilation), in registration order; and who defined it.
ARCHS: dict[str, ResNetConfig] = {}
SOURCES: dict[str, str] = {}


def register_model(config: ResNetConfig, source: str = "torchvision") -> Callable[[Callable], Callable[..., ResNet]]:
    """Register the decorated function's name as an architecture of ``config``'s structure; the function becomes
    ``create_model(name, **kwargs)`` (its own body, a docstring, is never run)."""
    def register(fn: Callable) -> Callable[..., ResNet]:
        name = fn.__name__
        if name in ARCHS:
            raise ValueError(f"architecture {name!r} registered twice")
        ARCHS[name], SOURCES[name] = config, source

        @functools.wraps(fn)
        def make(**kwargs: Any) -> ResNet:
            return create_model(name, **kwargs)

        return make

    return register


def list_models(source: str | None = None) -> list[str]:
    """Names accepted by :func:`create_model`, all or those of one ``source`` ("torchvision" or "timm")."""
    return [name for name in ARCHS if source is None or SOURCES[name] == source]


def arch_config(name: str, *, num_classes: int = 1000,
                replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False),
                in_channels: int = 3) -> ResNetConfig:
    """The :class:`ResNetConfig` of an architecture name (torchvision's or timm's)."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHS)}")
    return dataclasses.replace(ARCHS[name], num_classes=num_classes, in_channels=in_channels,
                               replace_stride_with_dilation=replace_stride_with_dilation)


def structure(config: ResNetConfig) -> ResNetConfig:
    """``config`` without what a name leaves open (head size, input channels, dilation)."""
    return dataclasses.replace(config, num_classes=1000, in_channels=3,
                               replace_stride_with_dilation=(False, False, False))


def arch_name(config: ResNetConfig) -> str | None:
    """The name whose structure ``config`` has (any head size), or None for a custom one."""
    want = structure(config)
    return next((name for name, c in ARCHS.items() if c == want), None)


def create_model(name: str | None, *, weights: Any = None, pretrained: bool = False, progress: bool = True,
                 num_classes: int | None = None, zero_init_residual: bool = False,
                 replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False),
                 in_channels: int = 3, drop_path_rate: float = 0.0, dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs | None = None, seed: int = 0) -> ResNet:
    """Build a model by name, e.g. ``create_model("resnet50", num_classes=10)`` or ``create_model("resnet50d")``.

    ``weights`` loads pretrained weights like torchvision (``"IMAGENET1K_V2"``, ``"DEFAULT"``,
    ``ResNet50_Weights.IMAGENET1K_V2``; ``pretrained=True`` is V1), from the Hugging Face Hub
    (``"hf-hub:timm/resnet50.a1_in1k"``, ``"microsoft/resnet-50"``) or from a file; see :mod:`resnet_flax.hub`.
    A pretrained model comes in eval mode. ``drop_path_rate`` adds timm's stochastic depth
    (:meth:`ResNet.set_drop_path_rate`), fresh or pretrained."""
    if name is not None and name.startswith("hf-hub:"):  # timm's spelling: the hub name in place of the architecture
        name, weights = None, name
    if weights is not None or pretrained:
        from resnet_flax.hub import pretrained_model

        if zero_init_residual or rngs is not None or in_channels != 3:
            raise ValueError("zero_init_residual, rngs and in_channels shape a fresh model; "
                             "they do not apply with weights=")
        model = pretrained_model(name, weights if weights is not None else True, num_classes=num_classes,
                                 replace_stride_with_dilation=replace_stride_with_dilation, dtype=dtype,
                                 progress=progress)
        if drop_path_rate:
            model.set_drop_path_rate(drop_path_rate)
        return model
    config = arch_config(name, num_classes=1000 if num_classes is None else num_classes, in_channels=in_channels,
                         replace_stride_with_dilation=replace_stride_with_dilation)
    return ResNet(config, zero_init_residual=zero_init_residual, drop_path_rate=drop_path_rate, dtype=dtype,
                  rngs=rngs if rngs is not None else nnx.Rngs(seed))
