"""torchvision's ResNet family as Flax NNX modules; imports no torch."""

from resnet_flax.io import WeightsError, flat_state, load, load_flat_state, save
from resnet_flax.layers import BatchNorm
from resnet_flax.model import (
    ARCHS,
    BasicBlock,
    Bottleneck,
    ResNet,
    ResNetConfig,
    arch_config,
    arch_name,
    create_model,
    list_models,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)

__all__ = [
    "ARCHS", "BasicBlock", "BatchNorm", "Bottleneck", "ResNet", "ResNetConfig", "WeightsError",
    "arch_config", "arch_name", "create_model", "flat_state", "list_models", "load", "load_flat_state", "save",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
    "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]
