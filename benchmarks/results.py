"""Result files: what each benchmark command measured, as JSON under ``benchmarks/results/``, with its host.

Every benchmark command (``python -m benchmarks``, ``python -m benchmarks.pipeline``, ``.end_to_end``,
``.converter``, ``.first_step``) writes one file per table it prints: ``benchmarks/results/KIND-TAG.json``,
where KIND is ``sweep``, ``models``, ``levers``, ``pipeline``, ``end-to-end``, ``converter`` or ``first-step``
and TAG names the host (``--results-tag``; default from the CPU model, its widest vector ISA and the core
count, or the GPU's name).
A file holds::

    {"kind": ..., "command": "python -m benchmarks --sweep", "date": "YYYY-MM-DD",
     "host": {"cpu", "isa", "cores", "gpu", ...}, "versions": {package: version}, "settings": {...},
     "rows": [...], "note": "...", "raw": {...}}

``rows`` are what the tables show (medians and ratios, unrounded); ``raw`` keeps every sample. The tables in
docs/performance.md are rendered from these files by ``python -m benchmarks.render``. Imports only the stdlib at
the top: the pipeline's children import neither jax nor torch (the host's CPU description, from
``resnet_flax.cpu``, is imported when a result is recorded).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
KINDS = ("sweep", "models", "levers", "pipeline", "end-to-end", "converter", "parity-eval", "parity-train",
         "first-step", "step-profile")
# CPU features that decide which kernels torch (oneDNN) and XLA:CPU can use, in /proc/cpuinfo's spelling.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "torchvision", "grain", "pillow", "numpy")


def _host_cpu() -> Any:
    """resnet_flax.cpu's description of this CPU (imported here, not at the top: the pipeline's children, which
    import this module, must not import jax, which the resnet_flax package does)."""
    from resnet_flax import cpu

    return cpu.host()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or ``platform.processor()``)."""
    return _host_cpu().model


def cpu_flags() -> list[str]:
    """The ISA extensions of :data:`ISA_FLAGS` this CPU reports (x86 ``flags``, Arm ``Features``)."""
    flags = _host_cpu().flags
    return [f for f in ISA_FLAGS if f in flags]


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name (``nvidia-smi``), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    return names[0] if out.returncode == 0 and names else None


def host() -> dict[str, Any]:
    """The machine a measurement ran on: CPU model, ISA extensions, cores, memory, GPU."""
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    c = _host_cpu()
    return {"cpu": c.model, "cpu_family": c.family, "cpu_model_number": c.model_number, "isa": cpu_flags(),
            "cores": os.cpu_count(), "memory_gib": memory_gib,
            "gpu": gpu_name(), "machine": platform.machine(), "os": platform.platform(terse=True),
            "python": platform.python_version()}


def versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of the packages a measurement depends on (None where absent)."""
    found: dict[str, str | None] = {}
    for pkg in packages:
        try:
            found[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            found[pkg] = None
    return found


def host_tag(h: dict[str, Any]) -> str:
    """A file-name tag for a host: the GPU's name, else CPU model + widest vector ISA + cores. A model name with no
    number in it ("AMD EPYC" names every generation) gets the x86 family and model numbers (``f26m2``)."""
    if h.get("gpu"):
        words = h["gpu"]
    else:
        isa = h.get("isa") or []
        widest = next((f for f in ("amx_tile", "avx512f", "avx2", "sve", "asimd") if f in isa), "")
        cpu = h.get("cpu", "cpu")
        if h.get("cpu_family") is not None and not re.search(r"\d", cpu):
            cpu += f" f{h['cpu_family']}m{h.get('cpu_model_number')}"
        words = f"{cpu} {widest.replace('_tile', '').replace('512f', '512')} {h.get('cores')}c"
    return re.sub(r"[^a-z0-9]+", "-", words.lower()).strip("-")


def command_line(module: str, argv: Sequence[str]) -> str:
    """``python -m module ARGS`` as one would type it."""
    return " ".join(["python", "-m", module, *argv])


def record(kind: str, command: str, rows: list[dict[str, Any]], *, settings: dict[str, Any] | None = None,
           raw: dict[str, Any] | None = None, note: str = "", packages: Sequence[str] = PACKAGES) -> dict[str, Any]:
    """A result file's content for rows measured now, on this machine."""
    assert kind in KINDS, kind
    return {"kind": kind, "command": command, "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            "host": host(), "versions": versions(packages), "settings": settings or {}, "rows": rows, "note": note,
            "raw": raw or {}}


def write(rec: dict[str, Any], results_dir: Path | None = None, tag: str | None = None) -> Path:
    """Write ``rec`` as ``RESULTS_DIR/KIND-TAG.json`` (replacing an earlier result of that host); its path."""
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{rec['kind']}-{tag or host_tag(rec['host'])}.json"
    path.write_text(json.dumps(rec, indent=1, default=str) + "\n")
    return path


def add_arguments(parser: Any) -> None:
    """``--results-dir`` / ``--results-tag`` / ``--no-results`` on a benchmark command's parser."""
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="where result files go (default: benchmarks/results); docs/performance.md renders "
                             "them with python -m benchmarks.render")
    parser.add_argument("--results-tag", help="file-name tag of the results: KIND-TAG.json (default: from the host)")
    parser.add_argument("--no-results", action="store_true", help="write no result file")


def save(args: Any, rec: dict[str, Any]) -> None:
    """Write ``rec`` unless ``--no-results``; say where on stderr."""
    if not getattr(args, "no_results", False):
        path = write(rec, args.results_dir, args.results_tag)
        print(f"results: {os.path.relpath(path)}", file=sys.stderr, flush=True)


# ---- rows: what each table shows, from a measurement's report (unrounded; render.py formats them) ----------

def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def model_rows(groups: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """One row per workload of ``python -m benchmarks`` (groups of :class:`benchmarks.harness.Result`)."""
    rows = []
    for group in groups:
        by = {r.case.impl: r for r in group}
        first = group[0].case
        ips = {k: r.images_per_s for k, r in by.items() if r.ok}
        shares = [s.foreign for r in group for s in r.samples if s.foreign is not None]
        rows.append({
            "arch": first.arch, "mode": first.mode, "image_size": first.image_size, "batch": first.batch,
            "dtype": first.dtype, "images_per_s": ips,
            "ratios": {k: v for k, v in {
                "flax/torch": _ratio(ips.get("flax"), ips.get("torch")),
                "flax-fast/torch": _ratio(ips.get("flax-fast"), ips.get("torch")),
                "conv_lever": _ratio(ips.get("flax-fast"), ips.get("flax-fast-xlaconv")),
                "flax-fast/torch.compile": _ratio(ips.get("flax-fast"), ips.get("torch.compile"))}.items()
                if v is not None},
            "compile_s": {k: r.ready["compile_s"] for k, r in by.items()
                          if r.ok and r.ready.get("compile_s") and k != "torch"},
            "peak_mb": {k: (r.memory.get("device_peak_mb") or r.memory.get("peak_rss_mb")) for k, r in by.items()
                        if r.ok and r.memory},
            "memory": "device" if any(r.memory.get("device_peak_mb") for r in group if r.ok) else "rss",
            "other_cpu": sorted(shares)[len(shares) // 2] if shares else None,
            "failed": {k: r.error for k, r in by.items() if not r.ok},
        })
    return rows


def lever_rows(groups: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """One row per lever and workload of ``python -m benchmarks --levers``."""
    rows = []
    for group in groups:
        by = {r.case.impl: r for r in group}
        ips = {k: r.images_per_s for k, r in by.items() if r.ok}
        for r in group:
            c = r.case
            base = c.impl.rsplit("+", 1)[0] if "+" in c.impl else None
            shares = [s.foreign for s in r.samples if s.foreign is not None]
            rows.append({"arch": c.arch, "mode": c.mode, "image_size": c.image_size, "batch": c.batch,
                         "lever": c.impl, "images_per_s": ips.get(c.impl),
                         "vs_torch": _ratio(ips.get(c.impl), ips.get("torch")) if c.impl != "torch" else None,
                         "vs_plain": _ratio(ips.get(c.impl), ips.get("plain")) if c.framework == "flax" else None,
                         "base": base if base in by else None,
                         "vs_base": _ratio(ips.get(c.impl), ips.get(base)) if base in by else None,
                         "compile_s": r.ready.get("compile_s") if r.ok else None,
                         "other_cpu": sorted(shares)[len(shares) // 2] if shares else None,
                         "error": r.error})
    return rows


def pipeline_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per worker count of ``python -m benchmarks.pipeline``."""
    rows = []
    for r in report.get("rows", []):
        impls = [k for k in ("grain", "torch", "grain-per-epoch") if k in r]
        ips = {k: r[k].get("steady_images_per_s") for k in impls}
        rows.append({"num_workers": r["num_workers"], "images_per_s": {k: v for k, v in ips.items() if v is not None},
                     "grain/torch": _ratio(ips.get("grain"), ips.get("torch")),
                     "first_epoch_s": {k: r[k]["first_epoch_s"] for k in impls if "first_epoch_s" in r[k]}})
    return rows


# digits_torch.py with DataLoader workers; with --in-memory; with --in-memory and a checkpoint every epoch
E2E_TORCH_IMPLS = ("torch", "torch-in-memory", "torch-in-memory-checkpoints")
E2E_IMPLS = (*E2E_TORCH_IMPLS, "flax")
# Each end-to-end command's name in the tables (the benchmark's report and docs/performance.md).
E2E_LABELS = {"torch": "plain PyTorch script (`benchmarks/digits_torch.py`)",
              "torch-in-memory": "plain PyTorch script, images in memory (`digits_torch.py --in-memory`)",
              "torch-in-memory-checkpoints": "the same, saving a checkpoint every epoch (`--checkpoint-dir`)",
              "flax": "`python -m train`"}


def fastest_torch_wall(summary: dict[str, Any]) -> float | None:
    """The end-to-end baseline: the wall seconds of the fastest PyTorch script that finished."""
    walls = [summary[i]["wall_s"] for i in E2E_TORCH_IMPLS if summary.get(i, {}).get("wall_s")]
    return min(walls) if walls else None


def end_to_end_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The commands of ``python -m benchmarks.end_to_end``: wall time, final validation top-1, and the fastest
    PyTorch script's wall time over this one's."""
    summary = report.get("summary", {})
    torch_wall = fastest_torch_wall(summary)
    return [{"impl": impl, "wall_s": summary.get(impl, {}).get("wall_s"),
             "val_top1": summary.get(impl, {}).get("val_top1"),
             "torch_wall_over_this": _ratio(torch_wall, summary.get(impl, {}).get("wall_s"))}
            for impl in E2E_IMPLS if impl in summary]


def converter_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The one row of ``python -m benchmarks.converter``."""
    if "error" in report:
        return []
    keys = ("arch", "params", "from_state_dict_s", "build_model_s", "save_s", "convert_total_s", "file_mb",
            "peak_rss_mb")
    return [{k: report.get(k) for k in keys}]
