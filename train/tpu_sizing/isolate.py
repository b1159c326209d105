"""The child that compiles: libtpu kept offline (its environment) and, where the kernel allows, no network.

``python -m train --compile-only`` never loads libtpu itself: :func:`run_isolated` re-runs the command as
``python -m train.tpu_sizing`` in a child with :data:`ISOLATION_ENV`, under ``unshare -n``.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from functools import cache

from train.tpu_sizing.chips import ACCELERATOR_TYPES, CORES_PER_CHIP

# libtpu reads these when it loads; the child sets them before JAX touches a backend.
ISOLATION_ENV = {
    "JAX_PLATFORMS": "cpu",  # no TPU client: the topology is described, never opened
    "TPU_SKIP_MDS_QUERY": "1",  # never ask the GCE metadata server for the accelerator type or workers
    "TPU_WORKER_HOSTNAMES": "localhost",  # otherwise looked up (metadata server) and warned about
    "TPU_WORKER_ID": "0",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # no /tmp/libtpu_lockfile: compiles run beside other JAX processes
    "TPU_STDERR_LOG_LEVEL": "3",
    "TPU_MIN_LOG_LEVEL": "3",
    "GRPC_VERBOSITY": "ERROR",
    "ENABLE_RUNTIME_UPTIME_TELEMETRY": "0",
}


@cache
def no_network_prefix() -> tuple[str, ...]:
    """``unshare -n`` (root) or ``unshare -rn`` (a user namespace) when the kernel allows, else nothing."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for flags in (("-n",), ("-r", "-n")):
        try:
            ok = subprocess.run([unshare, *flags, "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return (unshare, *flags)
    return ()


def isolation_env(topology: str | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default os.environ) plus :data:`ISOLATION_ENV` and a ``TPU_ACCELERATOR_TYPE`` for ``topology``."""
    env = dict(os.environ if base is None else base)
    env.update(ISOLATION_ENV)
    accel = accelerator_type(topology) if topology else None
    if accel:
        env["TPU_ACCELERATOR_TYPE"] = accel
    return env


def accelerator_type(topology: str) -> str | None:
    """``v5e:2x4`` -> ``v5litepod-8`` (what libtpu would ask the metadata server for), None if unknown."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)[:=_]([0-9x]+)(?:_(?:un)?twisted)?", topology)
    if not m:
        return None
    chips = math.prod(int(d) for d in m.group(2).split("x"))
    return f"{ACCELERATOR_TYPES[m.group(1)]}-{chips * CORES_PER_CHIP.get(m.group(1), 1)}"


def run_isolated(argv: Sequence[str], topology: str | None) -> int:
    """``python -m train.tpu_sizing ARGV`` in a child without network and with libtpu kept offline."""
    cmd = [*no_network_prefix(), sys.executable, "-m", "train.tpu_sizing", *argv]
    return subprocess.run(cmd, env=isolation_env(topology)).returncode
