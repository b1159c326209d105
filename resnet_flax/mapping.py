"""PyTorch state-dict names/layouts <-> resnet_flax names/layouts, and the architecture read off the tensors.

Both directions use the same rule: a torchvision key ``layer1.0.downsample.0.weight`` is the Flax path
``layer1.0.downsample.0`` plus the leaf given by ``TORCH_TO_FLAX_LEAF``, with a transposed layout for
convolution and linear weights. No per-layer table: the model's own variable list drives the mapping.
"""

from __future__ import annotations

import re

import numpy as np

from resnet_flax.errors import WeightsError, preview_keys
from resnet_flax.io import key_mismatch
from resnet_flax.model import ResNetConfig, se_channels

# (flax leaf, kind of owner module) -> torch leaf
FLAX_TO_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                      "var": "running_var", "num_batches_tracked": "num_batches_tracked"}
TORCH_TENSOR_NAMES = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}

# Other spellings of torchvision's structure seen in tutorials, one rule per spelling pattern.
_COMPONENT_RULES = [
    (re.compile(r"^(conv|bn|layer)_(\d+)$"), r"\1\2"),        # conv_1 -> conv1, layer_1 -> layer1
    (re.compile(r"^(down_sample|shortcut)$"), "downsample"),  # the projection branch
]


def normalize_key(key: str) -> str:
    """Rewrite one state-dict key to torchvision's spelling (``layer_1.0.bn_1.weight`` -> ``layer1.0.bn1.weight``)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        for pattern, repl in _COMPONENT_RULES:
            part = pattern.sub(repl, part)
        parts[i] = part
    return ".".join(parts)


STEM_KEYS = ("conv1.weight", "conv1.0.weight")  # torchvision's 7x7 stem conv; the first conv of timm's deep stem


def stem_prefixes(sd: dict[str, np.ndarray]) -> list[str]:
    """What precedes each stem conv among the (normalised) keys: ``["module."]`` for a DataParallel save."""
    return [k[: -len(stem)] for k in sd for stem in STEM_KEYS
            if k.endswith(stem) and "layer" not in k and np.ndim(sd[k]) == 4]


def resnet_prefixes(sd: dict[str, np.ndarray]) -> list[str]:
    """The prefixes under which a complete ResNet lies: a stem conv and the first block of all four stages.

    A U-Net's decoder (``decoder.blocks.0.conv1.0.weight``) has a ``conv1`` too, but no ``layer1..4`` beside it."""
    return sorted(p for p in set(stem_prefixes(sd))
                  if all(f"{p}layer{i}.0.conv1.weight" in sd for i in range(1, 5)))


def find_resnet(sd: dict[str, np.ndarray], prefix: str | None = None) -> str:
    """The prefix of the one ResNet in ``sd`` (normalised keys), or ``prefix`` when the caller picks one."""
    found = resnet_prefixes(sd)
    if prefix is not None:
        prefix = prefix if not prefix or prefix.endswith(".") else prefix + "."
        if prefix not in found:
            raise WeightsError(f"no complete ResNet under --prefix {prefix!r}; the file has one under: "
                               f"{', '.join(repr(p) for p in found) or 'none'}")
        return prefix
    if len(found) == 1:
        return found[0]
    if found:
        raise WeightsError(f"{len(found)} ResNets in one file, under {', '.join(repr(p) for p in found)}; "
                           "pick one with --prefix")
    stems = ", ".join(sorted(stem_prefixes(sd))) or "none"
    raise WeightsError("not a ResNet state dict: expected a stem 'conv1.weight' (or deep stem 'conv1.0.weight') with "
                       f"layer1..layer4 beside it (stems found under: {stems}); keys start with: "
                       f"{preview_keys(sorted(sd), 3)}")


def normalize_state_dict(sd: dict[str, np.ndarray], prefix: str | None = None) -> dict[str, np.ndarray]:
    """Torchvision spellings, with the wrapper prefix (``module.``, ``model.``, ``backbone.`` ...) removed.

    The prefix is the one a complete ResNet lies under (:func:`find_resnet`); keys outside it are kept as-is so
    that they are reported as unexpected rather than silently dropped.
    """
    sd = {normalize_key(k): v for k, v in sd.items()}
    prefix = find_resnet(sd, prefix)
    if not prefix:
        return sd
    return {(k.removeprefix(prefix)): v for k, v in sd.items()}


def infer_config(sd: dict[str, np.ndarray]) -> ResNetConfig:
    """Block type, blocks per stage, groups, width, classes and timm's stem/shortcut/SE options, read from a
    normalised state dict. A timm option this model lacks is named, with the tensor that shows it."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise WeightsError(f"not a ResNet state dict: no '{key}' tensor; pass a torchvision-style ResNet")
        return tuple(np.shape(sd[key]))

    stem_type, stem_width, stem = infer_stem(sd)
    fc = shape("fc.weight") if "fc.weight" in sd else (0, 0)  # no head: a backbone (timm num_classes=0)
    layers = []
    for i in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{i}\.(\d+)\.", k))}
        if not idx:
            raise WeightsError(f"not a ResNet state dict: no 'layer{i}.*' tensors")
        layers.append(max(idx) + 1)
    block = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    groups, width_per_group = 1, 64
    if block == "bottleneck":
        width, in_per_group = shape("layer1.0.conv2.weight")[:2]
        groups = width // in_per_group
        width_per_group = width // groups  # stage 1 has planes=64, so width = width_per_group * groups
    if len(fc) != 2 or len(stem) != 4:
        raise WeightsError(f"not a ResNet state dict: the stem conv has shape {stem} and fc.weight {fc}")
    unsupported(sd)
    avg_down = any(re.fullmatch(r"layer\d\.\d+\.downsample\.1\.weight", k) and np.ndim(v) == 4 for k, v in sd.items())
    se = any(re.fullmatch(r"layer\d\.\d+\.se\.fc1\.weight", k) for k in sd)
    return ResNetConfig(block, tuple(layers), num_classes=fc[0], groups=groups, width_per_group=width_per_group,
                        in_channels=stem[1], stem_type=stem_type, stem_width=stem_width, avg_down=avg_down, se=se)


def infer_stem(sd: dict[str, np.ndarray]) -> tuple[str, int, tuple[int, ...]]:
    """(stem_type, stem_width, shape of the first stem conv): a 7x7 ``conv1`` or timm's deep ``conv1.0/3/6``."""
    if "conv1.weight" in sd:
        return "", 64, tuple(np.shape(sd["conv1.weight"]))
    convs = [f"conv1.{i}.weight" for i in (0, 3, 6)]
    if missing := [k for k in convs if k not in sd]:
        raise WeightsError(f"a deep stem without {', '.join(missing)} is not supported; timm's deep stems have "
                           "three 3x3 convs: conv1.0, conv1.3, conv1.6")
    c0, c1, c2 = (int(np.shape(sd[k])[0]) for k in convs)
    if c2 == 2 * c1 and c0 == c1:
        return "deep", c1, tuple(np.shape(sd[convs[0]]))
    if c2 == 2 * c1 and c0 == 3 * (c1 // 4) and c1 >= 4:
        return "deep_tiered", c1, tuple(np.shape(sd[convs[0]]))
    raise WeightsError(f"a deep stem with {c0}, {c1}, {c2} channels is not supported; timm's 'deep' stem has "
                       "w, w, 2w and 'deep_tiered' 3*(w//4), w, 2w")


# timm options with tensors of their own that this model does not have: (key pattern, what it is).
_UNSUPPORTED = [
    (r"maxpool\.\d+\.weight", "a strided conv in place of the stem max-pool (timm's replace_stem_pool)"),
    (r"layer\d\.\d+\.se\.conv\.weight", "ECA attention (timm's ecaresnet*)"),
    (r"layer\d\.\d+\.se\.bn\.weight", "SE blocks with a BatchNorm inside"),
    (r"layer\d\.\d+\.(se|attn)\.(?!fc[12]\.).*weight", "this attention module (only timm's 'se' is)"),
]


def unsupported(sd: dict[str, np.ndarray]) -> None:
    """Raise naming the first timm option in ``sd`` that resnet_flax cannot represent."""
    for key in sorted(sd):
        for pattern, what in _UNSUPPORTED:
            if re.fullmatch(pattern, key):
                raise WeightsError(f"{what} is not supported (tensor {key})")
        if m := re.fullmatch(r"(layer\d\.\d+\.se)\.fc1\.weight", key):
            rd, channels = np.shape(sd[key])[:2]
            if rd != se_channels(channels) or f"{m.group(1)}.fc1.bias" not in sd:
                bias = "with" if f"{m.group(1)}.fc1.bias" in sd else "without"
                raise WeightsError(f"SE blocks with {rd} reduced channels for {channels}, {bias} bias, are not "
                                   f"supported (tensor {key}); timm's 'se' has {se_channels(channels)}, with bias")


def torch_key(flax_key: str) -> str:
    """``layer1.0.conv1.kernel`` -> ``layer1.0.conv1.weight``."""
    owner, _, leaf = flax_key.rpartition(".")
    return f"{owner}.{FLAX_TO_TORCH_LEAF[leaf]}"


# The order PyTorch modules register their children and tensors in (torchvision's, with timm's ``se``).
_TORCH_ORDER = ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "se", "downsample", "layer1", "layer2", "layer3",
                "layer4", "fc", "fc1", "fc2", "weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def torch_order(keys) -> list[str]:
    """State-dict keys sorted as PyTorch's ``state_dict()`` lists them (indices numerically)."""
    def rank(key: str):
        return [(0, int(p), "") if p.isdigit() else
                (1, _TORCH_ORDER.index(p) if p in _TORCH_ORDER else len(_TORCH_ORDER), p) for p in key.split(".")]

    return sorted(keys, key=rank)


def torch_to_flax_array(flax_key: str, value: np.ndarray) -> np.ndarray:
    """Layout change for one tensor: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
    value = np.asarray(value)
    if flax_key.endswith(".kernel"):
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    return value


def flax_to_torch_array(flax_key: str, value: np.ndarray) -> np.ndarray:
    """Inverse of :func:`torch_to_flax_array`."""
    value = np.asarray(value)
    if flax_key.endswith(".kernel"):
        return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    return value


def torch_shape(flax_key: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a variable with Flax shape ``flax_shape``."""
    return flax_to_torch_array(flax_key, np.empty(flax_shape, np.uint8)).shape


def torch_to_flax(sd: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Map a normalised state dict onto the Flax keys in ``expected`` (key -> Flax shape).

    Missing and unexpected keys are named; a shape that does not fit is named with both shapes.
    ``num_batches_tracked`` may be absent (checkpoints older than PyTorch 0.4.1 lack it): it becomes 0.
    """
    by_torch = {torch_key(k): k for k in expected}
    missing = sorted(t for t, f in by_torch.items() if t not in sd and not t.endswith("num_batches_tracked"))
    extra = sorted(k for k in sd if k not in by_torch)
    if missing or extra:
        raise WeightsError(key_mismatch(missing, extra))
    out = {}
    for tkey, fkey in by_torch.items():
        if tkey not in sd:
            out[fkey] = np.zeros(expected[fkey], np.int32)
            continue
        want = torch_shape(fkey, expected[fkey])
        if tuple(np.shape(sd[tkey])) != want:
            raise WeightsError(f"shape mismatch for {tkey}: checkpoint has {tuple(np.shape(sd[tkey]))}, "
                               f"the architecture needs {want}")
        out[fkey] = torch_to_flax_array(fkey, sd[tkey])
    return out


def flax_to_torch(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flax flat state -> torchvision state-dict arrays (numpy), in the model's order."""
    return {torch_key(k): flax_to_torch_array(k, v) for k, v in arrays.items()}
