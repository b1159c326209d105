"""Read PyTorch weight files into ``{name: float32 numpy array}`` without ever running pickled code."""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from resnet_flax.io import WeightsError, _first_line, is_converted_file

# Keys under which training scripts commonly nest the state dict.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")


def detect_format(path: Path) -> str:
    """'flax' (our converted file), 'safetensors', 'torchscript', 'torch' (zip or legacy pickle)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise WeightsError(f"{path}: the file is empty; pass a PyTorch checkpoint (.pth, .pt, .safetensors)")
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            raise WeightsError(f"{path}: a damaged zip archive (truncated download?); "
                               "download or save the checkpoint again") from None
        if any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        return "torch"
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]"):
        return "torch"  # legacy (non-zip) torch.save pickle
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n < (1 << 30):
            return "flax" if is_converted_file(path) else "safetensors"
    raise WeightsError(f"{path}: not a PyTorch checkpoint (neither a torch.save file, a TorchScript archive "
                       "nor a .safetensors file)")


def read_torch_file(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a torch.save file, a TorchScript archive or a .safetensors file, as float32 numpy.

    Pickles are read with ``torch.load(weights_only=True)``: a file that would execute code is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file; pass the path of a PyTorch checkpoint")
    fmt = detect_format(path)
    if fmt == "flax":
        raise WeightsError(f"{path}: already a converted resnet_flax file; load it with resnet_flax.load")
    if fmt == "safetensors":
        return _read_safetensors(path)
    import torch

    if fmt == "torchscript":
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise WeightsError(f"{path}: cannot read the TorchScript archive ({_first_line(e)})") from None
        return _to_numpy(module.state_dict(), path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e).lower() or "unsupported global" in str(e).lower():
            raise WeightsError(
                f"{path}: refused: the pickle references Python objects that would run code on load "
                "(only plain tensors are read, with torch.load(weights_only=True)); if you trust it, re-save "
                "just its weights with torch.save(model.state_dict(), 'weights.pth')") from None
        raise WeightsError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None
    except Exception as e:
        raise WeightsError(f"{path}: truncated or corrupt checkpoint, or not a torch.save file "
                           f"({_first_line(e)})") from None
    return _to_numpy(_unwrap(obj, path), path)


def _unwrap(obj, path: Path) -> dict:
    """The state dict itself, looking one or two levels into ``{"state_dict": ...}``-style wrappers."""
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        if obj and all(_is_tensor(v) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    what = f"a dict with keys {list(obj)[:6]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise WeightsError(f"{path}: no state dict of tensors found (the file holds {what}); "
                       "save one with torch.save(model.state_dict(), path)")


def _is_tensor(v) -> bool:
    import torch

    return isinstance(v, torch.Tensor)


def _to_numpy(sd, path: Path) -> dict[str, np.ndarray]:
    out = {}
    for k, v in sd.items():
        if not _is_tensor(v):
            raise WeightsError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        v = v.detach().cpu()
        out[k] = v.numpy() if k.endswith("num_batches_tracked") else v.float().numpy()
    return out


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        try:
            import torch  # noqa: F401 - reads bf16/fp16 files that numpy cannot hold
            framework = "pt"
        except ImportError:
            framework = "numpy"
        with safe_open(str(path), framework=framework) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: truncated or corrupt .safetensors file ({_first_line(e)})") from None
    if framework == "pt":
        return _to_numpy(tensors, path)
    return {k: (v if k.endswith("num_batches_tracked") else v.astype(np.float32)) for k, v in tensors.items()}
