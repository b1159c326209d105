"""train.host_memory: the block a step frees is reused by the next step, not faulted in afresh."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt")

PAGES = 128 * 2**20 // 4096  # 32,768: the pages of the 128 MiB blocks below

# A jitted computation with a 128 MiB temporary (sin(x) feeds a dot and a reduction, so XLA keeps it in its temp
# block), called until steady; prints the page faults of one more call.
JITTED = """
import resource, sys
if sys.argv[1] == "retain":
    from train.host_memory import retain_freed_memory
    assert retain_freed_memory()
import jax, jax.numpy as jnp
x, w = jnp.ones((2**20, 32), jnp.float32), jnp.ones((32, 4), jnp.float32)
f = jax.jit(lambda x: (jnp.sin(x) @ w).sum() + jnp.sin(x).max())
for _ in range(3):
    jax.block_until_ready(f(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
jax.block_until_ready(f(x))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

# What XLA's threads do with several devices: a worker thread allocates a 128 MiB block, touches every page, frees
# it; twice. Prints the page faults of the second round.
WORKER_THREAD = """
import ctypes, resource, sys, threading
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
if sys.argv[1] == "retain":
    from train.host_memory import retain_freed_memory
    assert retain_freed_memory()

def step():
    block = libc.malloc(128 * 2**20)
    ctypes.memset(block, 1, 128 * 2**20)
    libc.free(block)

def run():
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

t = threading.Thread(target=run)
t.start()
t.join()
"""


def faults(script: str, mode: str, devices: int) -> int:
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",  # the settings apply only to a process limited to the CPU
           "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.split()[-1])


def test_one_device_reuses_a_jitted_computations_temporaries():
    assert faults(JITTED, "default", 1) > PAGES // 2  # glibc unmapped the block: every page faults again
    assert faults(JITTED, "retain", 1) < PAGES // 20


def test_several_devices_reuse_a_block_that_a_worker_thread_freed():
    assert faults(WORKER_THREAD, "default", 2) > PAGES // 2
    assert faults(WORKER_THREAD, "retain", 2) < PAGES // 20
