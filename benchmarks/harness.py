"""Parent side: start one worker process per implementation, alternate timed calls, collect statistics.

Every sample is one call in one worker while the others sit idle, and the workers take turns, so a slow
stretch of the machine hits all of them alike. On Linux each sample also records how much CPU *other*
processes used meanwhile (from /proc). A sample taken during a burst (other processes above ``max_foreign``
of the machine and well above their usual share in this run) is retried, up to a limit, so a neighbour's
burst does not decide a ratio; a steady neighbour is reported, not fought. What was dropped is reported.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.config import Case
from benchmarks.worker import REPLY_PREFIX

ROOT = Path(__file__).resolve().parent.parent
SETTLE_S = 0.05  # idle gap between samples, so spinning worker threads of the previous call go quiet


class WorkerFailed(RuntimeError):
    """A worker process could not set up or run its case."""


def cpu_busy_ticks() -> int | None:
    """Busy clock ticks of the whole machine since boot (None where /proc/stat is missing)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return user + nice + system + irq + softirq + steal


def process_ticks(pid: int) -> int | None:
    """utime + stime of ``pid`` (all its threads) in clock ticks, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def worker_env() -> dict[str, str]:
    """The workers' environment: JAX must not preallocate GPU memory, or a second JAX worker would not fit
    (and ``peak_bytes_in_use`` then measures what the model needs)."""
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


class Worker:
    """A ``python -m benchmarks.worker`` process running one :class:`Case`."""

    def __init__(self, case: Case):
        self.case = case
        # A file, not a pipe, so a chatty worker never blocks; closed in close().
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker"], cwd=ROOT, env=worker_env(), text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        self.send(case.to_json())
        self.ready = self.receive()
        if self.ready.get("event") != "ready":
            self.close()
            raise WorkerFailed(self.ready.get("error", "worker exited during setup"))

    def send(self, line: str) -> None:
        """One line to the worker's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        """The next protocol reply (other stdout lines are skipped); an error dict if the worker died."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(REPLY_PREFIX):
                return json.loads(line[len(REPLY_PREFIX):])
        rc = self.proc.wait()
        self.stderr.seek(0)
        return {"event": "error", "error": f"worker exited (rc={rc}): {last_line(self.stderr.read()[-4000:])}"}

    def time_once(self, warm: bool = False) -> float:
        """Run one call in the worker and return its seconds (measured inside the worker); ``warm``: an untimed
        call just before it."""
        self.send(json.dumps({"cmd": "time", "warm": warm}))
        reply = self.receive()
        if "seconds" not in reply:
            raise WorkerFailed(reply.get("error", "no timing reply"))
        return float(reply["seconds"])

    def stop(self) -> dict[str, Any]:
        """Ask for the memory report and let the worker exit."""
        self.send(json.dumps({"cmd": "stop"}))
        report = self.receive()
        self.close()
        return report

    def close(self) -> None:
        """End the worker process (it was started here)."""
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def last_line(text: str) -> str:
    """The last non-empty line of ``text`` (an exception's message in a traceback)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


@dataclass
class Sample:
    """One timed call and the CPU share other processes took meanwhile (None where unknown)."""

    seconds: float
    foreign: float | None


def foreign_share(window_s: float = 0.5) -> float | None:
    """Share of the machine's CPUs busy over the next ``window_s`` while this harness sits idle."""
    busy0 = cpu_busy_ticks()
    time.sleep(window_s)
    busy1 = cpu_busy_ticks()
    if busy0 is None or busy1 is None:
        return None
    return (busy1 - busy0) / os.sysconf("SC_CLK_TCK") / (window_s * (os.cpu_count() or 1))


def wait_for_quiet(timing: Timing) -> bool:
    """Wait (up to ``timing.wait_quiet_s``) until other processes use at most ``max_foreign`` of the CPUs."""
    deadline = time.monotonic() + timing.wait_quiet_s
    while time.monotonic() < deadline:
        share = foreign_share()
        if share is None or share <= timing.max_foreign:
            return True
    return False


def timed_sample(worker: Worker, warm: bool = False) -> Sample:
    """One call in ``worker`` (after an untimed one if ``warm``), with the machine's busy ticks minus the worker's
    own around it."""
    busy0, own0 = cpu_busy_ticks(), process_ticks(worker.proc.pid)
    t0 = time.perf_counter()
    seconds = worker.time_once(warm)
    wall = time.perf_counter() - t0
    busy1, own1 = cpu_busy_ticks(), process_ticks(worker.proc.pid)
    if None in (busy0, own0, busy1, own1) or wall <= 0:
        return Sample(seconds, None)
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    foreign = max(0.0, ((busy1 - busy0) - (own1 - own0)) / ticks_per_s) / (wall * (os.cpu_count() or 1))
    return Sample(seconds, foreign)


@dataclass
class Result:
    """The measurement of one implementation on one workload."""

    case: Case
    ok: bool
    error: str | None = None
    samples: list[Sample] = field(default_factory=list)
    dropped: int = 0
    ready: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def median_s(self) -> float | None:
        """Median seconds per call over the kept samples."""
        return statistics.median(s.seconds for s in self.samples) if self.samples else None

    @property
    def images_per_s(self) -> float | None:
        """Images a call processes (batch x steps per call) over the median call time."""
        med = self.median_s
        return None if not med else self.case.batch * self.case.steps_per_call / med

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record."""
        return {
            "impl": self.case.impl, "framework": self.case.framework, "arch": self.case.arch,
            "mode": self.case.mode, "batch": self.case.batch, "image_size": self.case.image_size,
            "dtype": self.case.dtype, "ok": self.ok, "error": self.error,
            "images_per_s": self.images_per_s, "median_s": self.median_s,
            "samples_s": [round(s.seconds, 5) for s in self.samples],
            "foreign_cpu": [None if s.foreign is None else round(s.foreign, 3) for s in self.samples],
            "dropped_contended_samples": self.dropped,
            "compile_s": self.ready.get("compile_s"), "setup_s": self.ready.get("setup_s"),
            "device": self.ready.get("device"), "import_rss_mb": self.ready.get("import_rss_mb"),
            "peak_rss_mb": self.memory.get("peak_rss_mb"),
            "device_peak_mb": self.memory.get("device_peak_mb"),
            "flax_options": _flax_options(self.case), "torch_compile": self.case.torch_compile,
        }


def _flax_options(case: Case) -> dict[str, Any] | None:
    """The Flax levers of ``case`` as a plain dict (None for PyTorch)."""
    if case.framework != "flax":
        return None
    opts = case.flax
    return {"fold_bn": opts.fold_bn, "donate": opts.donate,
            "host_round_trip": opts.host_round_trip, "conv": opts.conv,
            "cpu_compiler_options": dict(opts.cpu_compiler_options)}


@dataclass(frozen=True)
class Timing:
    """How many samples to take and when to call one contended."""

    steps: int = 5
    max_foreign: float = 0.15  # share of the machine used by other processes that marks a sample contended
    burst_margin: float = 0.15  # ... if it is also this much above the run's median foreign share so far
    max_retries: int = 4  # extra rounds allowed to replace contended samples
    wait_quiet_s: float = 0.0  # before each sample, wait up to this long for other processes to go quiet
    # An untimed call right before each timed one. After the idle gap between samples (SETTLE_S) XLA:CPU's first
    # call is slower than the next (resnet18 inference b64 32 px on a 2-core EPYC VM: 29 vs 18 ms; torch 19.4 vs
    # 18.3 ms); img/s is the speed of a process that keeps calling, as a training or serving loop does.
    warm_call: bool = True

    def is_burst(self, foreign: float | None, history: list[float]) -> bool:
        """Whether other processes took an unusual share of the CPUs during a sample."""
        if foreign is None or foreign <= self.max_foreign:
            return False
        return not history or foreign > statistics.median(history) + self.burst_margin


def start_workers(cases: list[Case], log: Any) -> tuple[list[Worker], list[Result]]:
    """Start (one after another, so compile times do not overlap) a worker per case; failures become results."""
    workers, failed = [], []
    for case in cases:
        log(f"  setting up {case.impl} ({case.arch} {case.mode} b{case.batch})")
        try:
            workers.append(Worker(case))
        except WorkerFailed as e:
            log(f"    {case.impl}: n/a ({e})")
            failed.append(Result(case, ok=False, error=str(e)))
    return workers, failed


def measure(cases: list[Case], timing: Timing, log: Any = print) -> list[Result]:
    """Measure ``cases`` (one workload, several implementations) in alternation; results in ``cases`` order."""
    workers, failed = start_workers(cases, log)
    results = {id(w): Result(w.case, ok=True, ready=w.ready) for w in workers}
    rounds = 0
    history: list[float] = []  # foreign shares seen so far in this group
    while workers and rounds < timing.steps + timing.max_retries:
        rounds += 1
        for worker in list(workers):
            result = results[id(worker)]
            if len(result.samples) >= timing.steps:
                continue
            time.sleep(SETTLE_S)
            if timing.wait_quiet_s > 0:
                wait_for_quiet(timing)
            try:
                sample = timed_sample(worker, timing.warm_call)
            except WorkerFailed as e:
                result.ok, result.error = False, str(e)
                workers.remove(worker)
                worker.close()
                continue
            contended = timing.is_burst(sample.foreign, history)
            if sample.foreign is not None:
                history.append(sample.foreign)
            spare_rounds = timing.steps + timing.max_retries - rounds
            if contended and spare_rounds >= timing.steps - len(result.samples):
                result.dropped += 1
            else:
                result.samples.append(sample)
        if all(len(results[id(w)].samples) >= timing.steps for w in workers):
            break
    for worker in workers:
        results[id(worker)].memory = worker.stop()
    by_case = {id(r.case): r for r in list(results.values()) + failed}
    return [by_case[id(c)] for c in cases]
