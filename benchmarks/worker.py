"""The worker process: builds one :class:`~benchmarks.config.Case`, then times single calls on request.

Protocol (JSON lines; replies are prefixed with ``@@bench`` so library chatter on stdout is ignored):
stdin line 1 is the case; the worker replies ``{"event": "ready", ...}`` (or ``"error"``). Then each ``time``
command runs one call (after an untimed one, with ``"warm": true``) and replies its seconds; ``stop`` replies
the memory report and exits. Only the framework under test is imported, so the peak RSS is that framework's own.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.config import Case

REPLY_PREFIX = "@@bench "


@dataclass
class Workload:
    """A ready-to-time call plus what setting it up cost."""

    run: Callable[[], None]  # one inference batch or one training step; returns when the result is ready
    compile_s: float  # jit compile time (Flax) or first-call time (torch.compile); 0 for eager PyTorch
    device: str
    device_peak_bytes: Callable[[], int | None]  # accelerator peak memory, None on CPU


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reply(message: dict[str, Any]) -> None:
    """One protocol line on stdout."""
    sys.stdout.write(REPLY_PREFIX + json.dumps(message) + "\n")
    sys.stdout.flush()


def framework_module(case: Case) -> Any:
    """Import the module of the framework under test (only that one: the RSS stays its own)."""
    if case.framework == "flax":
        from benchmarks import flax_work

        return flax_work
    from benchmarks import torch_work

    return torch_work


def serve(case: Case) -> None:
    """Set up ``case``, report readiness, then answer ``time``/``stop`` commands until stopped."""
    started = time.perf_counter()
    module = framework_module(case)
    import_rss = peak_rss_mb()  # the framework's own footprint before any model exists
    workload = module.build(case)
    workload.run()  # warm-up outside the timed samples (also finishes lazy compiles)
    reply({"event": "ready", "compile_s": workload.compile_s, "setup_s": time.perf_counter() - started,
           "device": workload.device, "import_rss_mb": import_rss, "rss_after_setup_mb": peak_rss_mb()})
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "time":
            if command.get("warm"):  # an untimed call first: threads awake and caches filled, as in a busy loop
                workload.run()
            t0 = time.perf_counter()
            workload.run()
            reply({"seconds": time.perf_counter() - t0})
        elif command["cmd"] == "stop":
            peak = workload.device_peak_bytes()
            reply({"peak_rss_mb": peak_rss_mb(),
                   "device_peak_mb": None if peak is None else peak / 2**20})
            return


def main() -> int:
    """Entry point of ``python -m benchmarks.worker``."""
    case = Case.from_json(sys.stdin.readline())
    try:
        serve(case)
    except Exception as e:
        reply({"event": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300],
               "traceback": traceback.format_exc()[-2000:]})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
