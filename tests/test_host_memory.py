"""train.host_memory: a block freed by a worker thread is reused by the next allocation, not faulted in afresh."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt")

# Like an XLA:CPU step: a worker thread allocates a 128 MiB block, touches every page, frees it; twice. Prints
# the page faults of the second round.
SCRIPT = """
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
PAGES = 128 * 2**20 // 4096  # 32,768


def faults(mode: str) -> int:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the settings apply only to a process limited to the CPU
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.split()[-1])


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    assert faults("default") > PAGES // 2  # glibc unmapped the block: every page faults again
    assert faults("retain") < PAGES // 20
