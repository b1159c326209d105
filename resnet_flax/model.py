"""ResNet, ResNeXt and Wide ResNet as Flax NNX modules, structured and named like torchvision's resnet.py."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_flax.layers import (
    BatchNorm,
    DropPath,
    Dtype,
    conv,
    conv1x1,
    conv3x3,
    kaiming_normal_fan_out,
    linear,
    max_pool,
)

BlockName = Literal["basic", "bottleneck"]
StemType = Literal["", "deep", "deep_tiered"]
STEM_TYPES = ("", "deep", "deep_tiered")


class Sequential(nnx.List):
    """``torch.nn.Sequential``: the layers in order, their indices the parameter paths (``conv1.0``, ``conv1.1``)."""

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """The layers in order; ``mask`` goes to each BatchNorm (see :class:`BatchNorm`)."""
        for layer in self:
            x = layer(x, mask) if isinstance(layer, BatchNorm) else layer(x)
        return x


class ReLU(nnx.Module):
    """A parameter-free ReLU, holding its index in a :class:`Sequential` as in PyTorch."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class AvgPoolShortcut(nnx.Module):
    """The pool of timm's ``downsample_avg`` (``avg_down``), before the shortcut's stride-1 1x1 conv.

    Strided: 2x2/2 average with ``ceil_mode=True, count_include_pad=False`` (an odd edge averages what is
    there). In a dilated stage: timm's ``AvgPool2dSame(2, 1)``, zero padding on the high side, counted.
    Otherwise the identity (timm's ``nn.Identity`` at index 0).
    """

    def __init__(self, stride: int = 1, dilation: int = 1):
        self.stride = stride
        self.dilation = dilation

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.stride == 1 and self.dilation == 1:
            return x
        if self.stride == 1:
            return nnx.avg_pool(x, (2, 2), strides=(1, 1), padding=((0, 1), (0, 1)), count_include_pad=True)
        h, w = x.shape[1:3]
        return nnx.avg_pool(x, (2, 2), strides=(2, 2), padding=((0, h % 2), (0, w % 2)), count_include_pad=False)


def se_channels(channels: int) -> int:
    """timm's SE reduction: ``make_divisible(channels / 16, 8, round_limit=0)``."""
    return max(8, int(channels / 16 + 4) // 8 * 8)


class SqueezeExcite(nnx.Module):
    """timm's ``SEModule``: global mean, 1x1 conv with bias, ReLU, 1x1 conv with bias, sigmoid gate."""

    def __init__(self, channels: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        rd = se_channels(channels)
        self.fc1 = _conv1x1_bias(channels, rd, dtype=dtype, rngs=rngs)
        self.fc2 = _conv1x1_bias(rd, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        s = self.fc2(jax.nn.relu(self.fc1(s)))
        return x * jax.nn.sigmoid(s)


def _conv1x1_bias(in_planes: int, out_planes: int, *, dtype: Dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """A 1x1 conv with bias, initialised as timm's: Kaiming-normal fan_out kernel, PyTorch's default bias."""
    bound = 1.0 / math.sqrt(in_planes)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Conv(in_planes, out_planes, (1, 1), use_bias=True, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=kaiming_normal_fan_out, bias_init=bias_init, rngs=rngs)


class BasicBlock(nnx.Module):
    """Two 3x3 convs; the stride sits on ``conv1``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Sequential | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, *, zero_init_residual: bool = False,
                 se: bool = False, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and width_per_group=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(planes, dtype=dtype)
        self.conv2 = conv3x3(planes, planes, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(planes, dtype=dtype, zero_scale=zero_init_residual)
        self.se = SqueezeExcite(planes, dtype=dtype, rngs=rngs) if se else None
        self.drop_path: DropPath | None = nnx.data(None)  # timm's stochastic depth: ResNet.set_drop_path_rate
        self.downsample = downsample

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
        identity = x
        out = jax.nn.relu(self.bn1(self.conv1(x), mask))
        out = self.bn2(self.conv2(out), mask)
        if self.se is not None:
            out = self.se(out)
        if self.drop_path is not None:
            out = self.drop_path(out, rngs)
        if self.downsample is not None:
            identity = self.downsample(x, mask)
        return jax.nn.relu(out + identity)


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (grouped, strided: torchvision's "ResNet V1.5"), 1x1 expand."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Sequential | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, *, zero_init_residual: bool = False,
                 se: bool = False, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(width, dtype=dtype)
        self.conv2 = conv3x3(width, width, stride, groups, dilation, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(width, dtype=dtype)
        self.conv3 = conv1x1(width, planes * self.expansion, dtype=dtype, rngs=rngs)
        self.bn3 = BatchNorm(planes * self.expansion, dtype=dtype, zero_scale=zero_init_residual)
        self.se = SqueezeExcite(planes * self.expansion, dtype=dtype, rngs=rngs) if se else None
        self.drop_path: DropPath | None = nnx.data(None)  # timm's stochastic depth: ResNet.set_drop_path_rate
        self.downsample = downsample

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
        identity = x
        out = jax.nn.relu(self.bn1(self.conv1(x), mask))
        out = jax.nn.relu(self.bn2(self.conv2(out), mask))
        out = self.bn3(self.conv3(out), mask)
        if self.se is not None:
            out = self.se(out)
        if self.drop_path is not None:
            out = self.drop_path(out, rngs)
        if self.downsample is not None:
            identity = self.downsample(x, mask)
        return jax.nn.relu(out + identity)


BLOCKS: dict[str, type[BasicBlock | Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """Everything that fixes the parameter shapes and the forward pass; recorded in converted files.

    The last four fields are timm's options (defaults: torchvision's structure): ``stem_type`` ``"deep"`` is
    three 3x3 convs of ``stem_width``, ``stem_width``, ``2 * stem_width`` channels instead of the 7x7,
    ``"deep_tiered"`` the same with ``3 * (stem_width // 4)`` in the first; ``avg_down`` puts a 2x2 average
    pool before a stride-1 shortcut conv; ``se`` adds squeeze-and-excitation after each block's last BatchNorm.
    """

    block: BlockName
    layers: tuple[int, int, int, int]
    num_classes: int = 1000
    groups: int = 1
    width_per_group: int = 64
    replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False)
    in_channels: int = 3
    stem_type: StemType = ""
    stem_width: int = 64
    avg_down: bool = False
    se: bool = False

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
        if self.stem_type not in STEM_TYPES:
            raise ValueError(f"stem_type must be one of {STEM_TYPES}, got {self.stem_type!r}")
        if not self.stem_type and self.stem_width != 64:
            raise ValueError(f"stem_width {self.stem_width} needs a deep stem; the 7x7 stem always has 64 channels")
        if self.stem_type and self.stem_width < 4:
            raise ValueError(f"stem_width must be at least 4, got {self.stem_width}")
        for flag in ("avg_down", "se"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResNetConfig:
        return cls(**d)

    @property
    def stem_channels(self) -> tuple[int, ...]:
        """Output channels of the stem's convolutions, e.g. ``(64,)`` or timm's deep ``(32, 32, 64)``."""
        w = self.stem_width
        if self.stem_type == "deep":
            return (w, w, 2 * w)
        if self.stem_type == "deep_tiered":
            return (3 * (w // 4), w, 2 * w)
        return (64,)

    @property
    def timm_options(self) -> list[str]:
        """The timm options this structure uses (deep stem, avg-pool shortcuts, SE); empty: torchvision's own."""
        return [name for name, on in (("deep stem", self.stem_type), ("avg_down", self.avg_down), ("se", self.se))
                if on]

    @property
    def num_features(self) -> int:
        """Width of the pooled feature vector (the input of ``fc``)."""
        return 512 * BLOCKS[self.block].expansion


def stem_conv(config: ResNetConfig, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
    """torchvision's 7x7/2 conv, or timm's deep stem: 3x3/2, BN, ReLU, 3x3, BN, ReLU, 3x3 (as ``conv1.0`` .. ``.6``)."""
    if not config.stem_type:
        return conv(config.in_channels, 64, 7, stride=2, padding=3, dtype=dtype, rngs=rngs)
    c0, c1, c2 = config.stem_channels
    return Sequential([conv3x3(config.in_channels, c0, 2, dtype=dtype, rngs=rngs), BatchNorm(c0, dtype=dtype), ReLU(),
                       conv3x3(c0, c1, dtype=dtype, rngs=rngs), BatchNorm(c1, dtype=dtype), ReLU(),
                       conv3x3(c1, c2, dtype=dtype, rngs=rngs)])


class ResNet(nnx.Module):
    """torchvision's ResNet on NHWC input, with timm's deep stem, average-pool shortcuts and SE as options.

    ``model(x)`` gives logits (float32): ``forward_head(forward_features(x))`` as in timm. ``model.embed(x)``
    is the pooled vector ``fc`` receives, ``model.stages(x)`` the four stage outputs (a backbone's), and
    ``reset_classifier(n)`` gives a new head. ``model.train()`` and ``model.eval()`` select BatchNorm's
    mode. Parameters are float32; ``dtype`` sets the compute dtype. ``drop_path_rate`` adds timm's stochastic
    depth (:meth:`set_drop_path_rate`), which in train mode draws from the ``rngs`` given to the call.
    """

    def __init__(self, config: ResNetConfig, *, zero_init_residual: bool = False, drop_path_rate: float = 0.0,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        block = BLOCKS[config.block]
        self.inplanes = config.stem_channels[-1]
        self.dilation = 1
        self.conv1 = stem_conv(config, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(self.inplanes, dtype=dtype)
        kw = {"zero_init_residual": zero_init_residual, "dtype": dtype, "rngs": rngs}
        dilate = config.replace_stride_with_dilation
        self.layer1 = self._make_layer(block, 64, config.layers[0], **kw)
        self.layer2 = self._make_layer(block, 128, config.layers[1], stride=2, dilate=dilate[0], **kw)
        self.layer3 = self._make_layer(block, 256, config.layers[2], stride=2, dilate=dilate[1], **kw)
        self.layer4 = self._make_layer(block, 512, config.layers[3], stride=2, dilate=dilate[2], **kw)
        # num_classes=0: a headless backbone (timm's convention), whose __call__ gives the pooled features
        self.fc = linear(config.num_features, config.num_classes, dtype=dtype, rngs=rngs) if config.num_classes \
            else None
        self.drop_path_rate = 0.0
        if drop_path_rate:
            self.set_drop_path_rate(drop_path_rate)

    def blocks(self) -> list[BasicBlock | Bottleneck]:
        """Every residual block, ``layer1`` first, in forward order."""
        return [blk for name in ("layer1", "layer2", "layer3", "layer4") for blk in getattr(self, name)]

    def set_drop_path_rate(self, rate: float) -> None:
        """Stochastic depth as timm's ResNet: block i of the net's n drops its residual branch (``DropPath``)
        with probability ``rate * i / (n - 1)``; 0 removes it. No parameters change."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
        blocks = self.blocks()
        deterministic = self.bn1.use_running_average  # the model's current mode
        for net_block_idx, blk in enumerate(blocks):
            block_dpr = rate * net_block_idx / max(len(blocks) - 1, 1)  # one block: 0 (timm divides by 0)
            blk.drop_path = DropPath(block_dpr, deterministic=deterministic) if block_dpr > 0.0 else None
        self.drop_path_rate = float(rate)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False, *,
                    zero_init_residual: bool, dtype: Dtype, rngs: nnx.Rngs) -> nnx.List:
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            out = planes * block.expansion
            if self.config.avg_down:
                downsample = Sequential([AvgPoolShortcut(stride, self.dilation),
                                         conv1x1(self.inplanes, out, dtype=dtype, rngs=rngs),
                                         BatchNorm(out, dtype=dtype)])
            else:
                downsample = Sequential([conv1x1(self.inplanes, out, stride, dtype=dtype, rngs=rngs),
                                         BatchNorm(out, dtype=dtype)])
        kw = {"groups": self.config.groups, "base_width": self.config.width_per_group, "se": self.config.se,
              "zero_init_residual": zero_init_residual, "dtype": dtype, "rngs": rngs}
        layers = [block(self.inplanes, planes, stride, downsample, dilation=previous_dilation, **kw)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, dilation=self.dilation, **kw))
        return nnx.List(layers)

    def stem(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """conv1 (or the deep stem), bn1, ReLU, 3x3/2 max-pool (-inf padding, as torch's MaxPool2d(3, 2, padding=1))."""
        x = x.astype(self.dtype)
        x = self.conv1(x, mask) if isinstance(self.conv1, Sequential) else self.conv1(x)
        x = jax.nn.relu(self.bn1(x, mask))
        return max_pool(x, 3, 2, 1)

    def stages(self, x: jax.Array, mask: jax.Array | None = None, rngs: nnx.Rngs | None = None
               ) -> dict[str, jax.Array]:
        """The outputs of ``layer1`` .. ``layer4`` (NHWC, compute dtype), as a backbone gives them."""
        x = self.stem(x, mask)
        out = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            for blk in getattr(self, name):
                x = blk(x, mask, rngs)
            out[name] = x
        return out

    def forward_features(self, x: jax.Array, mask: jax.Array | None = None, rngs: nnx.Rngs | None = None
                         ) -> jax.Array:
        """The last stage's feature map (NHWC, compute dtype): the input of :meth:`forward_head`."""
        return self.stages(x, mask, rngs)["layer4"]

    def forward_head(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        """Global average pool then ``fc``: float32 logits, or with ``pre_logits`` the pooled vector ``fc`` gets.

        Headless (``fc`` None, ``num_classes=0``): the pooled vector in float32.
        """
        x = jnp.mean(x, axis=(1, 2))
        if pre_logits:
            return x
        return (x if self.fc is None else self.fc(x)).astype(jnp.float32)

    def embed(self, x: jax.Array, normalize: bool = False) -> jax.Array:
        """The pooled features (exactly the input of ``fc``) in float32, optionally L2-normalised."""
        feats = self.forward_head(self.forward_features(x), pre_logits=True).astype(jnp.float32)
        if normalize:
            feats = feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
        return feats

    def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs | None = None, seed: int = 0) -> None:
        """A new, freshly initialised ``fc`` for ``num_classes`` classes, none for 0 (timm's ``reset_classifier``)."""
        self.fc = linear(self.config.num_features, num_classes, dtype=self.dtype,
                         rngs=rngs if rngs is not None else nnx.Rngs(seed)) if num_classes else None
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits in float32 for NHWC images normalised like torchvision's (ImageNet mean/std).

        ``mask`` ([batch], 1 = real example) keeps masked-out examples out of train-mode BatchNorm statistics.
        ``rngs`` (its ``dropout`` stream) draws stochastic depth's masks in train mode, when the model has any.
        """
        return self.forward_head(self.forward_features(x, mask, rngs))
