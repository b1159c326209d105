"""Where a run's files live: a local path, or a URL (``gs://``, ``s3://``, ... whatever fsspec serves).

A local path stays a :class:`pathlib.Path`; a URL becomes an :class:`etils.epath.Path` (what Orbax writes
checkpoints through), which has the same methods. Files written to a URL are built completely first, then
uploaded as one object: an object store makes an object visible only once its upload completes, so a reader
never sees half of one and a killed writer leaves the previous version.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from etils import epath

from resnet_flax.atomic import atomic_write as local_atomic_write
from resnet_flax.errors import WeightsError

AnyPath = Path | epath.Path  # a local path or a URL; both have pathlib's methods
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_EXTRA = {"gs": "resnet-flax[gcs]", "gcs": "resnet-flax[gcs]"}  # the extra that installs each protocol's client


class StorageError(ValueError):
    """A URL whose storage client is not installed (or an unknown protocol); the message names the fix."""


class _DropBucketTypeNotice(logging.Filter):
    """gcsfs logs, on every request without Google credentials (an emulator), that it falls back to its plain
    client; nothing is wrong then."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Could not determine bucket type")


logging.getLogger("gcsfs").addFilter(_DropBucketTypeNotice())


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a URL (``scheme://...``) rather than a local file."""
    if isinstance(path, Path):
        return False
    return _URL.match(path if isinstance(path, str) else str(path)) is not None


def as_path(value: str | os.PathLike) -> AnyPath:
    """``value`` as a :class:`pathlib.Path`, or an :class:`etils.epath.Path` for a URL whose client is installed
    (:class:`StorageError` otherwise)."""
    if isinstance(value, epath.Path) and is_url(value):
        return value
    text = os.fspath(value) if not isinstance(value, str) else value
    if not is_url(text):
        return Path(text)
    check_client(text)
    return epath.Path(text)


def check_client(url: str) -> None:
    """Raise :class:`StorageError` unless fsspec can open ``url``'s protocol here."""
    import fsspec

    protocol = _URL.match(url)[1].lower()
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:  # fsspec's message names the package: "Install s3fs to access S3"
        fix = _EXTRA.get(protocol)
        how = f"pip install '{fix}'" if fix else str(e).split("\n")[0].rstrip(".").replace("Install", "install", 1)
        raise StorageError(f"{url}: reading and writing {protocol}:// URLs needs a client that is not installed; "
                           f"{how}") from None
    except ValueError:
        raise StorageError(f"{url}: fsspec knows no protocol {protocol}://; pass a local path or a gs://, s3://, "
                           "... URL") from None


def atomic_write(path: AnyPath, write: Callable[[str], object]) -> AnyPath:
    """Call ``write(local_tmp_path)`` then put that file at ``path`` in one step: a rename on a local disk, one
    object upload for a URL. A failure or kill before then leaves ``path`` as it was."""
    if not is_url(path):
        return local_atomic_write(path, write)
    with tempfile.TemporaryDirectory(prefix="resnet-flax-") as tmp:
        local = os.path.join(tmp, path.name)
        write(local)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(Path(local).read_bytes())
    return path


def _fs_and_path(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a local file or of the object at a URL."""
    if is_url(path):
        fs, p = _fs_and_path(str(path))
        return fs.cat_file(p)
    with open(path, "rb") as f:
        return f.read()


def sizes(urls: Sequence[str]) -> list[int]:
    """The sizes of the objects at ``urls`` (one listing request each, issued concurrently)."""
    if not urls:
        return []
    fs, _ = _fs_and_path(urls[0])
    return [int(s) for s in fs.sizes([fs._strip_protocol(u) for u in urls])]


def read_many(urls: Sequence[str]) -> list[bytes]:
    """The bytes of each object at ``urls``, fetched concurrently."""
    if not urls:
        return []
    fs, _ = _fs_and_path(urls[0])
    stripped = [fs._strip_protocol(u) for u in urls]
    found = fs.cat(stripped, on_error="raise")
    return [found[p] for p in stripped]


def find_files(folder: AnyPath) -> list[str]:
    """The URL of every object under the URL ``folder`` (one recursive listing), sorted."""
    fs, p = _fs_and_path(str(folder))
    return sorted(fs.unstrip_protocol(f) for f in fs.find(p))


@contextlib.contextmanager
def local_copy(path: AnyPath) -> Iterator[Path]:
    """``path`` itself when local; else a temporary local copy of the weights file or folder at the URL, removed
    afterwards (the readers of weights files need local files). A :class:`WeightsError` raised inside names the
    URL, not the copy."""
    if not is_url(path):
        yield Path(path)
        return
    tmp = tempfile.mkdtemp(prefix="resnet-flax-")
    try:
        local = Path(tmp) / path.name
        fs, p = _fs_and_path(str(path))
        try:
            if fs.isdir(p):
                fs.get(p.rstrip("/") + "/", str(local), recursive=True)
            else:
                fs.get_file(p, str(local))
        except FileNotFoundError:
            raise WeightsError(f"{path}: no such file or folder; pass the URL of a weights file") from None
        try:
            yield local
        except WeightsError as e:
            raise WeightsError(str(e).replace(str(local), str(path))) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
