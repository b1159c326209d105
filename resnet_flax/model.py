"""ResNet, ResNeXt and Wide ResNet as Flax NNX modules, structured and named like torchvision's resnet.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_flax.layers import BatchNorm, Dtype, conv, conv1x1, conv3x3, linear

BlockName = Literal["basic", "bottleneck"]


class BasicBlock(nnx.Module):
    """Two 3x3 convs; the stride sits on ``conv1``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nnx.List | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, *, zero_init_residual: bool = False,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and width_per_group=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(planes, dtype=dtype)
        self.conv2 = conv3x3(planes, planes, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(planes, dtype=dtype, zero_scale=zero_init_residual)
        self.downsample = downsample

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        identity = x
        out = jax.nn.relu(self.bn1(self.conv1(x), mask))
        out = self.bn2(self.conv2(out), mask)
        if self.downsample is not None:
            identity = self.downsample[1](self.downsample[0](x), mask)
        return jax.nn.relu(out + identity)


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (grouped, strided: torchvision's "ResNet V1.5"), 1x1 expand."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nnx.List | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, *, zero_init_residual: bool = False,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(width, dtype=dtype)
        self.conv2 = conv3x3(width, width, stride, groups, dilation, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(width, dtype=dtype)
        self.conv3 = conv1x1(width, planes * self.expansion, dtype=dtype, rngs=rngs)
        self.bn3 = BatchNorm(planes * self.expansion, dtype=dtype, zero_scale=zero_init_residual)
        self.downsample = downsample

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        identity = x
        out = jax.nn.relu(self.bn1(self.conv1(x), mask))
        out = jax.nn.relu(self.bn2(self.conv2(out), mask))
        out = self.bn3(self.conv3(out), mask)
        if self.downsample is not None:
            identity = self.downsample[1](self.downsample[0](x), mask)
        return jax.nn.relu(out + identity)


BLOCKS: dict[str, type[BasicBlock | Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """Everything that fixes the parameter shapes and the forward pass; recorded in converted files."""

    block: BlockName
    layers: tuple[int, int, int, int]
    num_classes: int = 1000
    groups: int = 1
    width_per_group: int = 64
    replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False)
    in_channels: int = 3

    def __post_init__(self):
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {self.block!r}")
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        object.__setattr__(self, "replace_stride_with_dilation",
                           tuple(bool(d) for d in self.replace_stride_with_dilation))
        if len(self.layers) != 4:
            raise ValueError(f"layers needs 4 block counts, got {self.layers}")
        if len(self.replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be a 3-element tuple, "
                             f"got {self.replace_stride_with_dilation}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResNetConfig:
        return cls(**d)

    @property
    def num_features(self) -> int:
        """Width of the pooled feature vector (the input of ``fc``)."""
        return 512 * BLOCKS[self.block].expansion


class ResNet(nnx.Module):
    """torchvision's ResNet on NHWC input.

    ``model(x)`` gives logits (float32): ``forward_head(forward_features(x))`` as in timm. ``model.embed(x)``
    is the pooled vector ``fc`` receives, ``model.stages(x)`` the four stage outputs (a backbone's), and
    ``reset_classifier(n)`` gives a new head. ``model.train()`` and ``model.eval()`` select BatchNorm's
    mode. Parameters are float32; ``dtype`` sets the compute dtype.
    """

    def __init__(self, config: ResNetConfig, *, zero_init_residual: bool = False,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        block = BLOCKS[config.block]
        self.inplanes = 64
        self.dilation = 1
        self.conv1 = conv(config.in_channels, self.inplanes, 7, stride=2, padding=3, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(self.inplanes, dtype=dtype)
        kw = {"zero_init_residual": zero_init_residual, "dtype": dtype, "rngs": rngs}
        dilate = config.replace_stride_with_dilation
        self.layer1 = self._make_layer(block, 64, config.layers[0], **kw)
        self.layer2 = self._make_layer(block, 128, config.layers[1], stride=2, dilate=dilate[0], **kw)
        self.layer3 = self._make_layer(block, 256, config.layers[2], stride=2, dilate=dilate[1], **kw)
        self.layer4 = self._make_layer(block, 512, config.layers[3], stride=2, dilate=dilate[2], **kw)
        self.fc = linear(512 * block.expansion, config.num_classes, dtype=dtype, rngs=rngs)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False, *,
                    zero_init_residual: bool, dtype: Dtype, rngs: nnx.Rngs) -> nnx.List:
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nnx.List([
                conv1x1(self.inplanes, planes * block.expansion, stride, dtype=dtype, rngs=rngs),
                BatchNorm(planes * block.expansion, dtype=dtype),
            ])
        kw = {"groups": self.config.groups, "base_width": self.config.width_per_group,
                  "zero_init_residual": zero_init_residual, "dtype": dtype, "rngs": rngs}
        layers = [block(self.inplanes, planes, stride, downsample, dilation=previous_dilation, **kw)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, dilation=self.dilation, **kw))
        return nnx.List(layers)

    def stem(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """conv1, bn1, ReLU and the 3x3/2 max-pool (-inf padding, as torch's MaxPool2d(3, 2, padding=1))."""
        x = jax.nn.relu(self.bn1(self.conv1(x.astype(self.dtype)), mask))
        return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    def stages(self, x: jax.Array, mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """The outputs of ``layer1`` .. ``layer4`` (NHWC, compute dtype), as a backbone gives them."""
        x = self.stem(x, mask)
        out = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            for blk in getattr(self, name):
                x = blk(x, mask)
            out[name] = x
        return out

    def forward_features(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """The last stage's feature map (NHWC, compute dtype): the input of :meth:`forward_head`."""
        return self.stages(x, mask)["layer4"]

    def forward_head(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        """Global average pool then ``fc``: float32 logits, or with ``pre_logits`` the pooled vector ``fc`` gets."""
        x = jnp.mean(x, axis=(1, 2))
        return x if pre_logits else self.fc(x).astype(jnp.float32)

    def embed(self, x: jax.Array, normalize: bool = False) -> jax.Array:
        """The pooled features (exactly the input of ``fc``) in float32, optionally L2-normalised."""
        feats = self.forward_head(self.forward_features(x), pre_logits=True).astype(jnp.float32)
        if normalize:
            feats = feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
        return feats

    def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs | None = None, seed: int = 0) -> None:
        """A new, freshly initialised ``fc`` for ``num_classes`` classes (as timm's ``reset_classifier``)."""
        self.fc = linear(self.config.num_features, num_classes, dtype=self.dtype,
                         rngs=rngs if rngs is not None else nnx.Rngs(seed))
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Logits in float32 for NHWC images normalised like torchvision's (ImageNet mean/std).

        ``mask`` ([batch], 1 = real example) keeps masked-out examples out of train-mode BatchNorm statistics.
        """
        return self.forward_head(self.forward_features(x, mask))


# name -> (block, layers, groups, width_per_group), exactly torchvision's factories.
ARCHS: dict[str, tuple[BlockName, tuple[int, int, int, int], int, int]] = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": ("bottleneck", (3, 4, 23, 3), 64, 4),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": ("bottleneck", (3, 4, 23, 3), 1, 128),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list(ARCHS)


def arch_config(name: str, *, num_classes: int = 1000,
                replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False),
                in_channels: int = 3) -> ResNetConfig:
    """The :class:`ResNetConfig` of a torchvision architecture name."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHS)}")
    block, layers, groups, width = ARCHS[name]
    return ResNetConfig(block, layers, num_classes, groups, width, replace_stride_with_dilation, in_channels)


def arch_name(config: ResNetConfig) -> str | None:
    """The torchvision name whose structure ``config`` has (any head size), or None for a custom one."""
    for name, (block, layers, groups, width) in ARCHS.items():
        if (config.block, config.layers, config.groups, config.width_per_group) == (block, layers, groups, width):
            return name
    return None


def create_model(name: str, *, num_classes: int = 1000, zero_init_residual: bool = False,
                 replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False),
                 in_channels: int = 3, dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None,
                 seed: int = 0) -> ResNet:
    """Build a model by torchvision name, e.g. ``create_model("resnet50", num_classes=10)``."""
    config = arch_config(name, num_classes=num_classes, in_channels=in_channels,
                         replace_stride_with_dilation=replace_stride_with_dilation)
    return ResNet(config, zero_init_residual=zero_init_residual, dtype=dtype,
                  rngs=rngs if rngs is not None else nnx.Rngs(seed))


def _factory(name: str) -> Callable[..., ResNet]:
    def make(**kwargs: Any) -> ResNet:
        return create_model(name, **kwargs)

    make.__name__ = make.__qualname__ = name
    make.__doc__ = f"torchvision's ``{name}``; keyword arguments as :func:`create_model`."
    return make


resnet18 = _factory("resnet18")
resnet34 = _factory("resnet34")
resnet50 = _factory("resnet50")
resnet101 = _factory("resnet101")
resnet152 = _factory("resnet152")
resnext50_32x4d = _factory("resnext50_32x4d")
resnext101_32x8d = _factory("resnext101_32x8d")
resnext101_64x4d = _factory("resnext101_64x4d")
wide_resnet50_2 = _factory("wide_resnet50_2")
wide_resnet101_2 = _factory("wide_resnet101_2")
