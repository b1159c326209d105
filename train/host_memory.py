"""Host memory for CPU training: keep what XLA:CPU frees after a step, so the next step does not fault it in again.

XLA:CPU allocates a step's temporaries as one block (187 MB for resnet18, batch 64, 64 px) and frees it when the
step ends. glibc hands blocks over 32 MB back to the kernel (``munmap``), and a thread's own arena maps any block
larger than its 64 MB heap, so every step page-faults its temporaries in afresh: 46,000 page faults and ~78 ms
of kernel time a step on a 2-core EPYC. With one arena that never unmaps and never trims, the block is reused:
~17 ms of kernel time a step. ``python -m benchmarks --levers ynn-reduce-only ynn-reduce-only+retain-memory``
measures the step both ways.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1


def retain_freed_memory() -> bool:
    """When JAX is limited to the CPU, on glibc: serve every block from one heap that is never given back; whether
    the settings took.

    The process then keeps its peak heap until it exits (a training run holds its peak for the whole run anyway),
    and all threads share one arena (XLA's threads allocate little besides these blocks). Call it before JAX
    creates its threads, i.e. before the first device query: a thread keeps the arena it first allocated from.
    A process that may use a GPU or TPU is left as it is (its host threads' trade-off is not measured).
    """
    if not _cpu_is_the_platform() or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _INT_MAX))
    return all(mallopt(param, value) == 1 for param, value in settings)


def _cpu_is_the_platform() -> bool:
    """Whether JAX is limited to the CPU (``JAX_PLATFORMS=cpu``, or :func:`train.platforms.leave_out_absent_tpu`
    found nothing else), read without starting a backend."""
    import jax

    return (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "").strip() == "cpu"
