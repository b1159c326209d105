"""Read PyTorch weight files into ``{name: float32 numpy array}`` without ever running pickled code."""

from __future__ import annotations

import hashlib
import os
import struct
import zipfile
from pathlib import Path

import numpy as np

from resnet_flax import torchfile
from resnet_flax.errors import WeightsError, first_line
from resnet_flax.io import is_converted_file
from resnet_flax.weights import WeightsInfo

# Keys under which training scripts commonly nest the state dict.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")
# The names PyTorch checkpoints go by, longest first (``x.pth.tar`` before ``x.tar``).
CHECKPOINT_SUFFIXES = (".pth.tar", ".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".tar")
# The weights of a Hugging Face (transformers or timm) hub folder, beside its config.json, in order of preference.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def checkpoint_stem(name: str) -> str:
    """``resnet50-11ad3fa6.pth`` -> ``resnet50-11ad3fa6``: the file name without its checkpoint suffix."""
    return next((name[: -len(s)] for s in CHECKPOINT_SUFFIXES if name.endswith(s)), name)


def weights_file(path: str | Path) -> Path:
    """``path`` itself, or the weights file of the Hugging Face hub folder ``path``."""
    path = Path(path)
    if not path.is_dir():
        if not path.is_file():
            raise WeightsError(f"{path}: no such file; pass the path of a PyTorch checkpoint")
        return path
    found = next((path / n for n in HF_WEIGHT_FILES if (path / n).is_file()), None)
    if found is None:
        raise WeightsError(f"{path}: a folder, not a file (and no {' or '.join(HF_WEIGHT_FILES)} in it); "
                           "pass the path of a PyTorch checkpoint")
    return found


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256 as hex, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def detect_format(path: Path) -> str:
    """'flax' (our converted file), 'safetensors', 'torchscript', 'torch' (zip or legacy pickle)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read it ({e.strerror}); check the path and its permissions") from None
    if not head:
        raise WeightsError(f"{path}: the file is empty; pass a PyTorch checkpoint (.pth, .pt, .safetensors)")
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError):
            raise WeightsError(f"{path}: a damaged zip archive (truncated download?); "
                               "download or save the checkpoint again") from None
        if any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        return "torch"
    # safetensors first: its 8-byte header length can begin with a byte that also opens a pickle (0x80, '(' ...)
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n < (1 << 30):
            return "flax" if is_converted_file(path) else "safetensors"
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]") or head[257:262] == b"ustar":
        return "torch"  # legacy (non-zip) torch.save pickle, or the tar format of PyTorch < 0.4
    raise WeightsError(f"{path}: not a PyTorch checkpoint (neither a torch.save file, a TorchScript archive "
                       "nor a .safetensors file)")


def read_torch_file(path: str | Path, *, allow_nonfinite: bool = False) -> dict[str, np.ndarray]:
    """The tensors of a torch.save file, a TorchScript archive or a .safetensors file, as float32 numpy.

    Needs no torch: pickles are read by :mod:`resnet_flax.torchfile`, which builds tensors and plain containers and
    refuses anything else, so no file runs code. Non-finite tensors are refused unless ``allow_nonfinite``.
    """
    return read_source(path, allow_nonfinite=allow_nonfinite)[0]


def read_source(path: str | Path, *, weights_set: str = "auto", allow_nonfinite: bool = False
                ) -> tuple[dict[str, np.ndarray], WeightsInfo, list[str]]:
    """Like :func:`read_torch_file`, plus what the checkpoint dict says (class names, mean/std, size) and notes
    on choices made: which weights set of a checkpoint holding model and EMA weights was taken."""
    from resnet_flax.formats import checkpoint_info, select_weights_set

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file; pass the path of a PyTorch checkpoint")
    fmt = detect_format(path)
    info, notes = WeightsInfo(), []
    if fmt == "flax":
        raise WeightsError(f"{path}: already a converted resnet_flax file; load it with resnet_flax.load")
    if fmt == "safetensors":
        sd = _read_safetensors(path)
    else:
        try:
            obj = torchfile.load(path)
        except torchfile.Refused as e:
            raise WeightsError(
                f"{path}: refused: it references {e}, code that would run on load (only tensors, storages and "
                "plain containers are read); if you trust it, re-save just its weights with "
                "torch.save(model.state_dict(), 'weights.pth')") from None
        except OSError as e:
            raise WeightsError(f"{path}: cannot read it ({e.strerror or e}); check the file") from None
        if fmt == "torchscript":
            if not isinstance(obj, torchfile.ScriptObject):
                raise WeightsError(f"{path}: a TorchScript archive without a module; save the model's "
                                   "state_dict() with torch.save instead")
            sd = torchfile.script_tensors(obj)
        else:
            info = checkpoint_info(obj)
            if isinstance(obj, dict):
                obj, info.weights_set, note = select_weights_set(obj, weights_set, path)
                notes += [note] if note else []
            sd = _unwrap(obj, path)
    if weights_set == "ema" and info.weights_set is None:
        raise WeightsError(f"{path}: --weights-set ema, but the file holds one set of weights; drop the flag")
    out = _to_float32(sd, path)
    if not allow_nonfinite:
        check_finite(out, path)
    return out, info, notes


def check_finite(sd: dict[str, np.ndarray], source: object) -> None:
    """Refuse NaN/inf weights: a model built from them outputs NaN, so converting them silently helps no one."""
    for k, v in sd.items():
        bad = int(v.size - np.count_nonzero(np.isfinite(v))) if v.dtype.kind == "f" else 0
        if bad:
            raise WeightsError(f"{source}: tensor {k!r} holds {bad} non-finite value(s) (NaN/inf); the "
                               "checkpoint is broken (pass --allow-nonfinite to convert it anyway)")


def _unwrap(obj, path: Path) -> dict:
    """The state dict itself, looking one or two levels into ``{"state_dict": ...}``-style wrappers."""
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        if obj and all(isinstance(v, np.ndarray) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    what = f"a dict with keys {list(obj)[:6]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise WeightsError(f"{path}: no state dict of tensors found (the file holds {what}); "
                       "save one with torch.save(model.state_dict(), path)")


def _to_float32(sd: dict, path: Path) -> dict[str, np.ndarray]:
    out = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise WeightsError(f"{path}: a state dict key {k!r} that is not a string")
        if not isinstance(v, np.ndarray):
            raise WeightsError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if v.dtype.kind == "c":
            raise WeightsError(f"{path}: entry {k!r} is complex; a ResNet's weights are real")
        out[k] = np.array(v) if k.endswith("num_batches_tracked") else v.astype(np.float32)
    return out


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        try:
            import torch  # noqa: F401 - reads bf16 files that safetensors' numpy reader refuses
            framework = "pt"
        except ImportError:
            framework = "numpy"
        with safe_open(str(path), framework=framework) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise WeightsError(f"{path}: truncated or corrupt .safetensors file ({first_line(e)})") from None
    if framework == "pt":
        return {k: v.numpy() if k.endswith("num_batches_tracked") else v.float().numpy() for k, v in tensors.items()}
    return tensors
