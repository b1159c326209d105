"""The converted-weights file: safetensors with Flax names and layouts, and the architecture in its metadata.

Reading it needs neither torch nor pickle, so ``resnet_flax.load("model.flax.safetensors")`` works anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file
from safetensors.numpy import save as serialize

from resnet_flax.atomic import atomic_write
from resnet_flax.errors import WeightsError, first_line, preview_keys
from resnet_flax.layers import Dtype
from resnet_flax.model import ResNet, ResNetConfig

FORMAT = "resnet_flax"
FORMAT_VERSION = "1"
SUFFIX = ".flax.safetensors"


def flat_state(model: ResNet) -> dict[str, np.ndarray]:
    """All variables (params and batch stats) as ``{"layer1.0.conv1.kernel": array}`` in Flax layout."""
    return {".".join(str(p) for p in path): np.asarray(var[...])
            for path, var in nnx.to_flat_state(nnx.state(model))}


def abstract_model(config: ResNetConfig, dtype: Dtype = jnp.float32) -> ResNet:
    """A model with shapes only (no random init): the cheap target for loading weights."""
    return nnx.eval_shape(lambda: ResNet(config, dtype=dtype, rngs=nnx.Rngs(0)))


def load_flat_state(model: ResNet, arrays: dict[str, np.ndarray]) -> ResNet:
    """Put ``arrays`` (as :func:`flat_state` gives them) into ``model``; every key and shape must match."""
    state = nnx.state(model)
    flat = nnx.to_flat_state(state)
    expected = {".".join(str(p) for p in path): var for path, var in flat}
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise WeightsError(key_mismatch(missing, extra))
    for key, var in expected.items():
        value = arrays[key]
        if tuple(value.shape) != tuple(var.shape):
            raise WeightsError(f"shape mismatch for {key}: file has {tuple(value.shape)}, "
                               f"the model needs {tuple(var.shape)}")
        var.set_value(jnp.array(value, dtype=var.dtype, copy=True))  # never alias the caller's buffer
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def key_mismatch(missing: list[str], extra: list[str]) -> str:
    """One line naming (some of) the missing and the unexpected keys."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {preview_keys(missing)}")
    if extra:
        parts.append(f"unexpected {len(extra)} key(s): {preview_keys(extra)}")
    return "; ".join(parts)


def save_file(arrays: dict[str, np.ndarray], filename: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' bytes written with Python's own file I/O: a full or failing disk raises :class:`OSError`
    with its errno and path (safetensors' writer wraps it in a SafetensorError with a traceback's worth of text)."""
    data = serialize(arrays, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data)


def save(model: ResNet, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None, *,
         exclusive: bool = False) -> Path:
    """Write ``model``'s weights and architecture to ``path`` (atomically; never replacing it if ``exclusive``)."""
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(model.config.to_dict())}
    metadata.update(extra_metadata or {})
    arrays = {k: np.array(v, order="C") for k, v in flat_state(model).items()}
    return atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=metadata), exclusive=exclusive)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata of ``path`` ({} if none)."""
    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


def is_converted_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is a file written by :func:`save`."""
    try:
        return read_metadata(path).get("format") == FORMAT
    except (SafetensorError, OSError, ValueError):
        return False


MAX_CONFIG_INT = 1 << 20  # far above any ResNet's channels, classes or blocks, far below what could hang a build


def load(path: str | os.PathLike, *, dtype: Dtype = jnp.float32,
         replace_stride_with_dilation: tuple[bool, bool, bool] | None = None) -> ResNet:
    """Load a converted file into a ready-to-run model (eval mode), with no torch needed.

    ``replace_stride_with_dilation`` overrides the recorded one (it changes no weight shape)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file; pass the path of a converted {SUFFIX} file")
    try:
        meta = read_metadata(path)
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({first_line(e)}); "
                           "re-run the conversion with `python -m convert`") from None
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path}: a safetensors file but not one written by resnet_flax; "
                           "convert it first with `python -m convert`")
    config = header_config(meta, len(arrays), path)
    if replace_stride_with_dilation is not None:
        config = dataclasses.replace(config, replace_stride_with_dilation=tuple(replace_stride_with_dilation))
    try:
        shell = abstract_model(config, dtype)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
        raise WeightsError(f"{path}: the header's architecture cannot be built ({first_line(e)}); "
                           "re-run the conversion with `python -m convert`") from None
    model = load_flat_state(shell, arrays)
    model.eval()
    return model


def header_config(meta: dict[str, str], num_tensors: int, path: object) -> ResNetConfig:
    """The architecture a converted file's header declares, checked against the tensors it really holds
    before anything is built (a tampered header must not build a huge model)."""
    bad = (f"{path}: the header's architecture is invalid or tampered with ({{}}); "
           "re-run the conversion with `python -m convert`")
    try:
        d = json.loads(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(bad.format(f"config: {first_line(e)}")) from None
    if not isinstance(d, dict):
        raise WeightsError(bad.format("config is not a JSON object"))
    for key, value in d.items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int | float) and not isinstance(v, bool) and not 0 <= v <= MAX_CONFIG_INT:
                raise WeightsError(bad.format(f"{key} = {v}"))
    try:
        config = ResNetConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise WeightsError(bad.format(first_line(e))) from None
    # Every block holds at least two convolutions and two BatchNorms (>= 10 tensors).
    if sum(config.layers) * 10 > num_tensors:
        raise WeightsError(bad.format(f"{sum(config.layers)} blocks declared, {num_tensors} tensors stored"))
    return config
