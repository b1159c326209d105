"""The host CPU as /proc/cpuinfo describes it: model name, family/model numbers and ISA flags.

One parser for everything that depends on the CPU: the XLA:CPU options (:mod:`resnet_flax.conv` picks them by ISA),
the compilation cache's per-CPU folder (``train.compile_cache.host_key``) and the host line of benchmark results.
Stdlib only, so importing it costs nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """One CPU's description: ``model`` name, x86 ``family``/``model_number`` (None elsewhere) and ISA ``flags``."""

    model: str
    flags: frozenset[str] = frozenset()
    family: int | None = None
    model_number: int | None = None
    machine: str = ""

    def has(self, *flags: str) -> bool:
        """Whether the CPU reports every one of ``flags`` (in /proc/cpuinfo's spelling, e.g. ``avx512f``)."""
        return all(f in self.flags for f in flags)


def parse(text: str, machine: str = "") -> CpuInfo:
    """The first processor described by ``text`` (the contents of /proc/cpuinfo; x86 or Arm spelling)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if not line.strip() and fields.get("flags", fields.get("Features")):
            break  # the end of the first processor's block
        if sep and key not in fields:
            fields[key] = value.strip()
    model = fields.get("model name") or fields.get("Processor") or fields.get("CPU part") or ""

    def number(key: str) -> int | None:
        try:
            return int(fields[key], 0)
        except (KeyError, ValueError):
            return None

    family = number("cpu family")
    return CpuInfo(model=model, flags=frozenset((fields.get("flags") or fields.get("Features") or "").split()),
                   family=family, model_number=number("model") if family is not None else None, machine=machine)


@functools.cache
def host() -> CpuInfo:
    """This machine's CPU (read once per process); the model falls back to ``platform.processor()``."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        text = ""
    info = parse(text, platform.machine())
    if not info.model:
        info = dataclasses.replace(info, model=platform.processor() or platform.machine())
    return info
