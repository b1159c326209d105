"""One run per workdir: an exclusive ``flock`` on ``WORKDIR/.lock``, which the kernel releases when the
process exits or is killed (no stale lock to clean up after SIGKILL or a power loss)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from train.errors import WorkdirError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[Path]:
    """Create ``workdir`` if needed, check that it can be read and written, and hold its lock while inside.

    A workdir created here and left holding nothing but the lock (the run failed before writing) is removed.
    """
    workdir = Path(workdir)
    created = not workdir.exists()
    fd = _acquire(workdir)
    try:
        yield workdir
    finally:
        with contextlib.suppress(OSError):
            if created and [p.name for p in workdir.iterdir()] == [LOCK_FILE]:
                (workdir / LOCK_FILE).unlink()  # while still locked: a waiting opener sees the inode change
                workdir.rmdir()
        os.close(fd)  # releases the lock


def _acquire(workdir: Path) -> int:
    while True:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise WorkdirError(f"cannot use --workdir {workdir} ({e.strerror}); pass a folder you can write to"
                               ) from None
        try:
            if not os.access(workdir, os.R_OK | os.W_OK | os.X_OK):
                raise WorkdirError(f"cannot use --workdir {workdir} (not readable and writable by you); fix its "
                                   "permissions or pass another folder")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise WorkdirError(f"--workdir {workdir} is in use by another run (pid {holder}); wait for it to "
                                   "finish or stop it, or pass another --workdir") from None
            try:
                same = os.stat(workdir / LOCK_FILE).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the lock file was removed by its last holder meanwhile: lock the new one
