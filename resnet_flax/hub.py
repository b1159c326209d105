"""Pretrained weights by name: download (like torch.hub), verify, convert once, cache the converted file.

Cache folder: ``$RESNET_FLAX_HOME``, else ``$XDG_CACHE_HOME/resnet_flax``, else ``~/.cache/resnet_flax``;
converted files live in its ``converted/``, downloads in its ``checkpoints/`` (removed once converted). A file
already in torch's hub cache (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch``) is used in place.
Hugging Face Hub names go through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE`` and token apply).
A second call reads the converted file only: no network, no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from resnet_flax.atomic import atomic_write
from resnet_flax.errors import WeightsError
from resnet_flax.io import SUFFIX, load, read_metadata
from resnet_flax.layers import Dtype
from resnet_flax.loading import convert_file, load_model
from resnet_flax.model import ResNet
from resnet_flax.reader import CHECKPOINT_SUFFIXES, checkpoint_stem, sha256_file
from resnet_flax.weights import WeightsInfo, get_weights, weights_info

ENV_HOME = "RESNET_FLAX_HOME"
CHUNK = 1 << 20


def cache_dir() -> Path:
    """Where converted weights (and downloads in progress) are kept."""
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg, "resnet_flax").expanduser()


def torch_hub_checkpoints() -> Path:
    """torch.hub's download folder (``torch.hub.get_dir()/checkpoints``), computed without torch."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(xdg, "torch")
    return Path(torch_home, "hub", "checkpoints").expanduser()


def download(url: str, dst: Path, *, hash_prefix: str = "", progress: bool = True) -> str:
    """Fetch ``url`` into ``dst`` atomically, checking the sha256 prefix; returns the full sha256.

    Raises :class:`urllib.error.URLError` / :class:`OSError` when the server cannot be reached."""
    from tqdm import tqdm

    digest = hashlib.sha256()

    def write(tmp: str) -> None:
        req = urllib.request.Request(url, headers={"User-Agent": "resnet_flax"})
        with urllib.request.urlopen(req, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dst.name,
                      disable=not progress, file=sys.stderr) as bar:
                while chunk := r.read(CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if total is not None and f.tell() != total:
                raise WeightsError(f"{url}: download ended after {f.tell()} of {total} bytes; try again")
        if not digest.hexdigest().startswith(hash_prefix):
            raise WeightsError(f"{url}: the download's sha256 {digest.hexdigest()[:16]}... does not start with "
                               f"{hash_prefix!r} from its file name (corrupt or tampered); try again")

    atomic_write(dst, write)
    return digest.hexdigest()


def pretrained_model(arch: str | None, weights: Any, *, num_classes: int | None = None,
                     replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False),
                     dtype: Dtype = jnp.float32, progress: bool = True) -> ResNet:
    """``arch`` with ``weights``: a registry name/enum/True, ``"hf-hub:org/name"``, ``"org/name"``, or a file."""
    from resnet_flax.registry import ARCHS

    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and (Path(weights).exists() or weights.endswith(
            CHECKPOINT_SUFFIXES))):
        model = load_model(weights, arch=arch, dtype=dtype, replace_stride_with_dilation=replace_stride_with_dilation)
    elif isinstance(weights, str) and (weights.startswith("hf-hub:") or weights.count("/") == 1):
        model = hf_hub_model(weights, arch=arch, dtype=dtype, replace_stride_with_dilation=replace_stride_with_dilation)
    else:
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
        w = get_weights(arch, weights)
        path = cached_weights(w, progress=progress)
        model = load(path, dtype=dtype, replace_stride_with_dilation=replace_stride_with_dilation)
    if num_classes is not None and num_classes != model.config.num_classes:
        raise ValueError(f"num_classes={num_classes} does not fit the weights, which have "
                         f"{model.config.num_classes} classes; drop num_classes (and replace the head to fine-tune)")
    return model


def converted_path(name: str) -> Path:
    """Where the converted form of the download ``name`` (``resnet50-11ad3fa6.pth``) is cached."""
    return cache_dir() / "converted" / (checkpoint_stem(name) + SUFFIX)


def cached_weights(w, *, progress: bool = True) -> Path:
    """The converted file of registry weights ``w``: from the cache, else converted from a download."""
    out = converted_path(w.filename)
    if out.is_file():
        return out
    src, digest, ours = _find_download(w)
    if src is None:
        dst = cache_dir() / "checkpoints" / w.filename
        try:
            digest = download(w.url, dst, hash_prefix=w.hash_prefix, progress=progress)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", None) or e
            raise WeightsError(
                f"cannot download {w.url} ({reason}) and nothing is cached at {out}; fetch that file elsewhere and "
                f"run `python -m convert {w.filename} --out {out}` (or put it in {dst.parent})") from None
        src, ours = dst, True
    convert_file(src, out, arch=w.arch, info=weights_info(w, digest))
    if ours:
        src.unlink(missing_ok=True)
    return out


def _find_download(w) -> tuple[Path | None, str | None, bool]:
    """A verified copy of ``w``'s file already on disk: torch's hub cache, then ours (a conversion cut short)."""
    for folder, ours in ((torch_hub_checkpoints(), False), (cache_dir() / "checkpoints", True)):
        path = folder / w.filename
        if path.is_file():
            digest = sha256_file(path)
            if digest.startswith(w.hash_prefix):
                return path, digest, ours
            print(f"warning: ignoring {path}: its sha256 does not match {w.hash_prefix!r}", file=sys.stderr)
    return None, None, False


def hf_hub_model(name: str, *, arch: str | None = None, dtype: Dtype = jnp.float32,
                 replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False)) -> ResNet:
    """A ResNet from the Hugging Face Hub: timm (``hf-hub:timm/resnet50.a1_in1k``) or transformers
    (``microsoft/resnet-50``) repositories, through ``huggingface_hub`` and its cache; converted once."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
        )
    except ImportError:
        raise WeightsError(f"{name}: loading from the Hugging Face Hub needs huggingface_hub; "
                           "pip install huggingface_hub") from None
    repo_id, _, revision = name.removeprefix("hf-hub:").partition("@")
    try:
        config_path = Path(hf_hub_download(repo_id, "config.json", revision=revision or None))
        out = cache_dir() / "converted" / f"hf--{repo_id.replace('/', '--')}--{config_path.parent.name[:12]}{SUFFIX}"
        if not out.is_file():
            with contextlib.suppress(EntryNotFoundError, LocalEntryNotFoundError):  # optional: eval transform
                hf_hub_download(repo_id, "preprocessor_config.json", revision=revision or None)
            missing: Exception | None = None
            for filename in ("model.safetensors", "pytorch_model.bin"):
                try:
                    src = Path(hf_hub_download(repo_id, filename, revision=revision or None))
                    break
                except EntryNotFoundError as e:  # LocalEntryNotFoundError (offline, not cached) is one too
                    missing = missing if isinstance(missing, LocalEntryNotFoundError) else e
            else:
                if isinstance(missing, LocalEntryNotFoundError):
                    raise missing
                raise WeightsError(f"{name}: the repository has neither model.safetensors nor pytorch_model.bin")
            convert_file(src, out, arch=arch, info=WeightsInfo(source=f"hf-hub:{name.removeprefix('hf-hub:')}"))
    except LocalEntryNotFoundError:
        raise WeightsError(f"{name}: not in the Hugging Face cache and the Hub cannot be reached (offline: "
                           "HF_HUB_OFFLINE or no network); run once online or copy the cache folder") from None
    except HFValidationError as e:
        raise WeightsError(f"{name}: not a Hugging Face repository name ({str(e).splitlines()[0]}); "
                           "write it as org/name or hf-hub:org/name") from None
    except HfHubHTTPError as e:
        raise WeightsError(f"{name}: the Hugging Face Hub refused ({str(e).splitlines()[0]}); check the name "
                           "(and HF_TOKEN for private repositories)") from None
    return load_model(out, arch=arch, dtype=dtype, replace_stride_with_dilation=replace_stride_with_dilation)


def file_info(path: str | os.PathLike) -> WeightsInfo:
    """What a converted file records about its weights (class names, eval transform, source)."""
    return WeightsInfo.from_metadata(read_metadata(path))


__all__ = ["cache_dir", "cached_weights", "download", "file_info", "hf_hub_model", "pretrained_model",
           "torch_hub_checkpoints"]
