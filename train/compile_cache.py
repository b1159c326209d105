"""The persistent compilation cache: a rerun, a resume, ``--eval-only`` and ``train.predict`` load the XLA programs
an earlier process compiled instead of compiling them again.

JAX keys each entry on the program, the jax/jaxlib version, XLA_FLAGS, the compile options and the devices, so a
change of any of these compiles afresh. JAX's key does not name the host CPU, for which XLA:CPU generates code
(AVX2 or AVX-512, ...): each CPU model and instruction set gets its own sub-folder, so a cache folder shared between
machines never hands one CPU another's code. A cache holds code that this process runs: a folder that other users
may write to is not used.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

from resnet_flax import cpu

OFF = "off"
MAX_BYTES = 4 * 2**30  # least recently used entries go beyond this


def default_dir() -> Path:
    """``$RESNET_FLAX_HOME/xla``, else ``$XDG_CACHE_HOME/resnet_flax/xla``, else ``~/.cache/resnet_flax/xla``."""
    from resnet_flax.hub import cache_dir

    return cache_dir() / "xla"


def host_key() -> str:
    """A short name for this machine's CPU model and instruction set (what XLA:CPU compiles for)."""
    host = cpu.host()
    return hashlib.sha256(f"{host.machine}|{host.model}|{' '.join(sorted(host.flags))}".encode()).hexdigest()[:16]


def enable(directory: str | Path | None) -> Path | None:
    """Turn the cache on in ``directory``/<host key>; returns the folder used, or None when off.

    ``None`` means the default: ``JAX_COMPILATION_CACHE_DIR`` when it is set (JAX then uses it as given), else
    :func:`default_dir`. ``"off"`` turns the cache off. A folder that cannot be made, or that other users may
    write to, gives one warning line and no cache: the run goes on, compiling as usual."""
    if directory is None and jax.config.jax_compilation_cache_dir:
        _tune()
        return Path(jax.config.jax_compilation_cache_dir)
    if str(directory) == OFF:
        _use(None)
        return None
    path = Path(directory or default_dir()).expanduser() / host_key()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        unsafe = _writable_by_others(path)
    except OSError as e:
        print(f"warning: no compilation cache ({e.strerror or e}: {path}); compiling from scratch",
              file=sys.stderr)
        return None
    if unsafe:
        print(f"warning: not using the compilation cache {path}: {unsafe}, and a cache holds code this process "
              "runs; pass --compile-cache with a folder of your own", file=sys.stderr)
        return None
    _use(path)
    _tune()
    return path


def _writable_by_others(path: Path) -> str:
    """Why another user could change what is in ``path`` (empty when no one can): it and every folder above it
    belong to this user or root and are writable by no one else, unless sticky (as /tmp is)."""
    for p in (path, *path.parents):
        st = p.stat()
        if st.st_uid not in (os.getuid(), 0):
            return f"{p} belongs to another user"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            return f"{p} is writable by other users"
    return ""


def _use(path: Path | None) -> None:
    """Point JAX at ``path`` (None: no cache), also after an earlier compile in this process used another."""
    if jax.config.jax_compilation_cache_dir != (str(path) if path else None):
        jax.config.update("jax_compilation_cache_dir", str(path) if path else None)
        compilation_cache.reset_cache()


def _tune() -> None:
    """Cache every program, however quick to compile (the many small ones add up to seconds), and bound the
    folder's size (which also makes JAX lock entries: several processes may share the folder), unless the
    environment already says otherwise."""
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
