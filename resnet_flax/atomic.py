"""Atomic file writes: a reader never sees a half-written file, and a killed writer leaves nothing behind."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import threading
from pathlib import Path

from resnet_flax.errors import WeightsError

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


def _sigterm_is_default() -> bool:
    """Whether SIGTERM still has its default action, asked of the C library too: a handler installed outside
    Python (JAX's preemption notifier, on multi-host runs) looks like SIG_DFL to ``signal.getsignal``, and
    setting SIG_DFL back afterwards would silently remove it."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        action = ctypes.create_string_buffer(256)  # struct sigaction; sa_handler is its first member
        if libc.sigaction(signal.SIGTERM, None, action) != 0:
            return True
    except (OSError, AttributeError):  # no C library to ask: Python's view is all there is
        return True
    return ctypes.c_void_p.from_buffer(action).value in (None, 0)  # SIG_DFL is 0


@contextlib.contextmanager
def _cleanup_on_sigterm():
    """Turn SIGTERM into an exception while writing, so ``finally`` removes the temporary file."""
    if threading.current_thread() is not threading.main_thread() or not _sigterm_is_default():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
