"""Host memory for CPU training: keep what XLA:CPU frees after a step, so the next step does not fault it in again.

XLA:CPU allocates a step's temporaries as one block (187 MB for resnet18, batch 64, 64 px) and frees it when the
step ends. glibc hands blocks over 32 MB back to the kernel (``munmap``), and a thread's own arena maps any block
larger than its 64 MB heap, so every step page-faults its temporaries in afresh: 46,000 page faults and ~78 ms
of kernel time a step on a 2-core EPYC. Two ways keep the block:

- One local CPU device (a plain ``python -m train`` on a CPU): JAX runs each computation on the thread that
  calls it (``jax_cpu_enable_async_dispatch`` off), the loop's main thread, whose heap (the main arena) never
  unmaps or trims. Every other thread keeps its own arena: the GEMM workspaces XLA's threads allocate for every
  matmul do not queue on one lock.
- Several local CPU devices (fake devices, tests): their computations run on XLA's threads, so every thread
  shares the main arena (one arena), which keeps the block but serialises every allocation on its lock and
  searches its free lists: resnet18's step spends ~9 % of its cycles in ``_int_malloc`` and more in lock waits.

Measured side by side (resnet18, 2-core Zen 5 EPYC, processes alternating): the one-device way takes the train
step from 205-220 to 176-181 ms at 64 px (batch 64) and from 604-638 to 512-546 ms at 224 px (batch 16) against
one arena. ``python -m benchmarks --levers ynn-reduce-only ynn-reduce-only+retain-memory`` measures a step with
and without these settings.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re

# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1


def retain_freed_memory() -> bool:
    """When JAX is limited to the CPU, on glibc: keep the blocks a step frees for the next step (see the module's
    docstring for how); whether the settings took.

    The process then keeps its peak heap until it exits (a training run holds its peak for the whole run anyway).
    Call it before JAX starts its backend, i.e. before the first device query: the dispatch mode is fixed when
    the CPU client is made, and a thread keeps the arena it first allocated from. With one local device, run the
    steps from the main thread (a thread of its own gets an arena that unmaps large blocks). A process that may
    use a GPU or TPU is left as it is (its host threads' trade-off is not measured).
    """
    if not _cpu_is_the_platform() or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _INT_MAX)]
    if local_cpu_devices() == 1:
        import jax

        jax.config.update("jax_cpu_enable_async_dispatch", False)
    else:
        settings.append((M_ARENA_MAX, 1))
    return all(mallopt(param, value) == 1 for param, value in settings)


def local_cpu_devices() -> int:
    """The CPU devices JAX will make in this process (``jax_num_cpu_devices``, else XLA_FLAGS' forced count, else
    1), read without starting a backend."""
    import jax

    configured = jax.config.jax_num_cpu_devices
    if configured is not None and configured > 0:
        return configured
    forced = re.findall(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(forced[-1]) if forced else 1


def _cpu_is_the_platform() -> bool:
    """Whether JAX is limited to the CPU (``JAX_PLATFORMS=cpu``, or :func:`train.platforms.leave_out_absent_tpu`
    found nothing else), read without starting a backend."""
    import jax

    return (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "").strip() == "cpu"
