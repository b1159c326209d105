"""PyTorch state-dict names/layouts <-> resnet_flax names/layouts, and the architecture read off the tensors.

Both directions use the same rule: a torchvision key ``layer1.0.downsample.0.weight`` is the Flax path
``layer1.0.downsample.0`` plus the leaf given by ``TORCH_TO_FLAX_LEAF``, with a transposed layout for
convolution and linear weights. No per-layer table: the model's own variable list drives the mapping.
"""

from __future__ import annotations

import re

import numpy as np

from resnet_flax.io import WeightsError, key_mismatch, preview_keys
from resnet_flax.model import ResNetConfig

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


def normalize_state_dict(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Torchvision spellings, with any wrapper prefix (``module.``, ``model.``, ``backbone.`` ...) removed.

    The prefix is whatever precedes the stem conv ``conv1.weight``; keys outside it are kept as-is so
    that they are reported as unexpected rather than silently dropped.
    """
    sd = {normalize_key(k): v for k, v in sd.items()}
    stems = [k[: -len("conv1.weight")] for k in sd
             if k.endswith("conv1.weight") and "layer" not in k and np.ndim(sd[k]) == 4]
    if len(stems) != 1:
        found = ", ".join(sorted(stems)) if stems else "none"
        raise WeightsError(f"not a ResNet state dict: expected one stem 'conv1.weight' key (found {found}); "
                           f"keys start with: {preview_keys(sorted(sd), 3)}")
    prefix = stems[0]
    if not prefix:
        return sd
    return {(k.removeprefix(prefix)): v for k, v in sd.items()}


def infer_config(sd: dict[str, np.ndarray]) -> ResNetConfig:
    """Block type, blocks per stage, groups, width and classes, read from a normalised state dict."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise WeightsError(f"not a ResNet state dict: no '{key}' tensor; pass a torchvision-style ResNet")
        return tuple(np.shape(sd[key]))

    stem = shape("conv1.weight")
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
        raise WeightsError(f"not a ResNet state dict: conv1.weight has shape {stem} and fc.weight {fc}")
    return ResNetConfig(block, tuple(layers), num_classes=fc[0], groups=groups,
                        width_per_group=width_per_group, in_channels=stem[1])


def torch_key(flax_key: str) -> str:
    """``layer1.0.conv1.kernel`` -> ``layer1.0.conv1.weight``."""
    owner, _, leaf = flax_key.rpartition(".")
    return f"{owner}.{FLAX_TO_TORCH_LEAF[leaf]}"


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
