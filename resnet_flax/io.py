"""The converted-weights file: safetensors with Flax names and layouts, and the architecture in its metadata.

Reading it needs neither torch nor pickle, so ``resnet_flax.load("model.flax.safetensors")`` works anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import signal
import threading
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
        parts.append(f"missing {len(missing)} key(s): {preview_keys(missing)}")
    if extra:
        parts.append(f"unexpected {len(extra)} key(s): {preview_keys(extra)}")
    return "; ".join(parts)


def preview_keys(keys: list[str], n: int = 5) -> str:
    """The first ``n`` keys and how many more, for a one-line message."""
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


TMP_MARK = ".partial-"  # temporary files are named ``.NAME.partial-PID-RANDOM``


def atomic_write(path: str | os.PathLike, write, *, exclusive: bool = False) -> Path:
    """Call ``write(tmp_path)`` then move it onto ``path``, so no reader ever sees a half-written file.

    The result gets the mode the user's umask gives new files. ``exclusive=True`` never replaces an existing
    ``path`` (of two concurrent writers exactly one wins; the other gets :class:`WeightsError`). The temporary
    file is removed on any failure or SIGTERM; ones left by a killed process are removed by the next write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    if exclusive and path.exists():
        raise WeightsError(f"{path} exists; pass --overwrite to replace it or --out for another path")
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        mode = tmp.stat().st_mode & 0o777  # 0666 less the umask, as the kernel applied it to this new file
        with _cleanup_on_sigterm():
            write(str(tmp))
            os.chmod(tmp, mode)  # writers that replace the file (safetensors does) would leave 0600
            if exclusive:
                _link_exclusive(tmp, path)
            else:
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _link_exclusive(tmp: Path, path: Path) -> None:
    """Create ``path`` from ``tmp`` atomically, failing if it exists (a hard link never replaces a file)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise WeightsError(f"{path} exists (written meanwhile by another process?); pass --overwrite to replace "
                           "it or --out for another path") from None
    except OSError:  # a file system without hard links: claim the name first, then move the data in
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            raise WeightsError(f"{path} exists (written meanwhile by another process?); pass --overwrite to "
                               "replace it or --out for another path") from None
        os.replace(tmp, path)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of ``path`` whose writing process is gone (killed with SIGKILL, power loss)."""
    prefix = f".{path.name}{TMP_MARK}"
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for p in candidates:
        pid = p.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _cleanup_on_sigterm():
    """Turn SIGTERM into an exception while writing, so ``finally`` removes the temporary file."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


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


def first_line(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` for embedding an exception in a one-line error, cut between words."""
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    if len(line) <= limit:
        return line
    cut = line[:limit - 3].rsplit(" ", 1)[0] if " " in line[:limit - 3] else line[:limit - 3]
    return cut.rstrip(" ,;:(") + "..."
