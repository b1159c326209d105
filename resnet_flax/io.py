"""The converted-weights file: safetensors with Flax names and layouts, and the architecture in its metadata.

Reading it needs neither torch nor pickle, so ``resnet_flax.load("model.flax.safetensors")`` works anywhere.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from resnet_flax.layers import Dtype
from resnet_flax.model import ResNet, ResNetConfig

FORMAT = "resnet_flax"
FORMAT_VERSION = "1"
SUFFIX = ".flax.safetensors"


class WeightsError(ValueError):
    """A weights file or state dict that does not fit the model; the message is one line."""


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
        parts.append(f"missing {len(missing)} key(s): {_some(missing)}")
    if extra:
        parts.append(f"unexpected {len(extra)} key(s): {_some(extra)}")
    return "; ".join(parts)


def _some(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save(model: ResNet, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s weights and architecture to ``path`` (atomically)."""
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(model.config.to_dict())}
    metadata.update(extra_metadata or {})
    arrays = {k: np.array(v, order="C") for k, v in flat_state(model).items()}
    return atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=metadata))


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


def load(path: str | os.PathLike, *, dtype: Dtype = jnp.float32) -> ResNet:
    """Load a converted file into a ready-to-run model (eval mode), with no torch needed."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file; pass the path of a converted {SUFFIX} file")
    try:
        meta = read_metadata(path)
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({_first_line(e)}); "
                           "re-run the conversion with `python -m convert`") from None
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path}: a safetensors file but not one written by resnet_flax; "
                           "convert it first with `python -m convert`")
    config = ResNetConfig.from_dict(json.loads(meta["config"]))
    model = load_flat_state(abstract_model(config, dtype), arrays)
    model.eval()
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
