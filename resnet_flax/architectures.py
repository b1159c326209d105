"""The architectures: torchvision's ResNet family, then timm's ResNet-D/T and SE variants."""

from __future__ import annotations

from typing import Any

from resnet_flax.model import ResNet, ResNetConfig
from resnet_flax.registry import register_model

_D = {"stem_type": "deep", "stem_width": 32, "avg_down": True}  # timm's ResNet-D
_T = {"stem_type": "deep_tiered", "stem_width": 32, "avg_down": True}  # timm's ResNet-T


@register_model(ResNetConfig("basic", (2, 2, 2, 2)))
def resnet18(**kwargs: Any) -> ResNet:
    """``resnet18``: torchvision's ResNet-18 (He et al., 2015); keyword arguments as ``create_model``."""


@register_model(ResNetConfig("basic", (3, 4, 6, 3)))
def resnet34(**kwargs: Any) -> ResNet:
    """``resnet34``: torchvision's ResNet-34; keyword arguments as ``create_model``."""


@register_model(ResNetConfig("bottleneck", (3, 4, 6, 3)))
def resnet50(**kwargs: Any) -> ResNet:
    """``resnet50``: torchvision's ResNet-50; keyword arguments as ``create_model``."""


@register_model(ResNetConfig("bottleneck", (3, 4, 23, 3)))
def resnet101(**kwargs: Any) -> ResNet:
    """``resnet101``: torchvision's ResNet-101; keyword arguments as ``create_model``."""


@register_model(ResNetConfig("bottleneck", (3, 8, 36, 3)))
def resnet152(**kwargs: Any) -> ResNet:
    """``resnet152``: torchvision's ResNet-152; keyword arguments as ``create_model``."""


@register_model(ResNetConfig("bottleneck", (3, 4, 6, 3), groups=32, width_per_group=4))
def resnext50_32x4d(**kwargs: Any) -> ResNet:
    """``resnext50_32x4d``: torchvision's ResNeXt-50 32x4d (Xie et al., 2017); keyword arguments as ``create_model``."""


@register_model(ResNetConfig("bottleneck", (3, 4, 23, 3), groups=32, width_per_group=8))
def resnext101_32x8d(**kwargs: Any) -> ResNet:
    """``resnext101_32x8d``: torchvision's ResNeXt-101 32x8d; keyword arguments as ``create_model``."""


@register_model(ResNetConfig("bottleneck", (3, 4, 23, 3), groups=64, width_per_group=4))
def resnext101_64x4d(**kwargs: Any) -> ResNet:
    """``resnext101_64x4d``: torchvision's ResNeXt-101 64x4d; keyword arguments as ``create_model``."""


@register_model(ResNetConfig("bottleneck", (3, 4, 6, 3), width_per_group=128))
def wide_resnet50_2(**kwargs: Any) -> ResNet:
    """``wide_resnet50_2``: torchvision's Wide ResNet-50-2 (Zagoruyko & Komodakis, 2016)."""


@register_model(ResNetConfig("bottleneck", (3, 4, 23, 3), width_per_group=128))
def wide_resnet101_2(**kwargs: Any) -> ResNet:
    """``wide_resnet101_2``: torchvision's Wide ResNet-101-2; keyword arguments as ``create_model``."""


@register_model(ResNetConfig("basic", (2, 2, 2, 2), **_D), "timm")
def resnet18d(**kwargs: Any) -> ResNet:
    """``resnet18d``: timm's ResNet-18-D (deep stem, avg-pool shortcuts); keyword arguments as ``create_model``."""


@register_model(ResNetConfig("bottleneck", (2, 2, 2, 2), **_D), "timm")
def resnet26d(**kwargs: Any) -> ResNet:
    """``resnet26d``: timm's ResNet-26-D; keyword arguments as ``create_model``."""


@register_model(ResNetConfig("basic", (3, 4, 6, 3), **_D), "timm")
def resnet34d(**kwargs: Any) -> ResNet:
    """``resnet34d``: timm's ResNet-34-D; keyword arguments as ``create_model``."""


@register_model(ResNetConfig("bottleneck", (3, 4, 6, 3), **_D), "timm")
def resnet50d(**kwargs: Any) -> ResNet:
    """``resnet50d``: timm's ResNet-50-D; keyword arguments as ``create_model``."""


@register_model(ResNetConfig("bottleneck", (3, 4, 23, 3), **_D), "timm")
def resnet101d(**kwargs: Any) -> ResNet:
    """``resnet101d``: timm's ResNet-101-D; keyword arguments as ``create_model``."""


@register_model(ResNetConfig("bottleneck", (3, 8, 36, 3), **_D), "timm")
def resnet152d(**kwargs: Any) -> ResNet:
    """``resnet152d``: timm's ResNet-152-D; keyword arguments as ``create_model``."""


@register_model(ResNetConfig("basic", (1, 1, 1, 1), **_T), "timm")
def resnet10t(**kwargs: Any) -> ResNet:
    """``resnet10t``: timm's ResNet-10-T (tiered deep stem, avg-pool shortcuts)."""


@register_model(ResNetConfig("bottleneck", (1, 1, 1, 1), **_T), "timm")
def resnet14t(**kwargs: Any) -> ResNet:
    """``resnet14t``: timm's ResNet-14-T; keyword arguments as ``create_model``."""


@register_model(ResNetConfig("bottleneck", (3, 4, 6, 3), se=True), "timm")
def seresnet50(**kwargs: Any) -> ResNet:
    """``seresnet50``: timm's SE-ResNet-50 (squeeze-and-excitation, Hu et al., 2018)."""


@register_model(ResNetConfig("bottleneck", (3, 4, 6, 3), groups=32, width_per_group=4, se=True), "timm")
def seresnext50_32x4d(**kwargs: Any) -> ResNet:
    """``seresnext50_32x4d``: timm's SE-ResNeXt-50 32x4d; keyword arguments as ``create_model``."""
