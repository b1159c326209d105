"""Formatting: the comparison table, the lever table, and the JSON file."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import Result
from benchmarks.results import E2E_LABELS
from benchmarks.results import end_to_end_rows as results_end_to_end_rows


def fmt(value: float | None, spec: str = ".1f", missing: str = "n/a") -> str:
    """``value`` formatted, or ``missing`` when it is None."""
    return missing if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None if either is missing."""
    return None if a is None or not b else a / b


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _by_impl(results: Sequence[Result]) -> dict[str, Result]:
    return {r.case.impl: r for r in results}


def _mem(r: Result | None) -> str:
    """Peak memory of one implementation: device peak on an accelerator, else the worker's peak RSS."""
    if r is None or not r.ok:
        return "n/a"
    device = r.memory.get("device_peak_mb")
    return fmt(device if device is not None else r.memory.get("peak_rss_mb"), ".0f")


def foreign_cpu(group: Sequence[Result]) -> float | None:
    """Median share of the CPUs that other processes used during the group's timed calls."""
    shares = [s.foreign for r in group for s in r.samples if s.foreign is not None]
    return statistics.median(shares) if shares else None


def _compile_s(r: Result | None) -> str:
    """jit compile seconds (Flax) or first-call seconds (torch.compile) of one implementation."""
    return fmt(r.ready.get("compile_s") if r is not None and r.ok else None)


def comparison_rows(groups: Sequence[Sequence[Result]], with_compile: bool) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per workload (arch, mode, size, batch) with every implementation side by side.

    "conv lever" is flax-fast over flax-fast with XLA's convolutions only (``--conv-lever``): what
    resnet_flax.conv's per-shape choice bought; "-" where it changes nothing at that size.
    """
    compiled = ("flax", "flax-fast", "torch.compile") if with_compile else ("flax", "flax-fast")
    memory = ("torch", "flax", "flax-fast", "torch.compile") if with_compile else ("torch", "flax", "flax-fast")
    header = ["arch", "mode", "px", "batch", "torch img/s", "flax img/s", "flax-fast img/s", "flax/torch",
              "fast/torch", "conv lever"]
    if with_compile:
        header += ["torch.compile img/s", "fast/compile"]
    header += [f"compile s ({', '.join(compiled)})", f"peak MB ({', '.join(memory)})", "other procs CPU"]
    rows = []
    for group in groups:
        by = _by_impl(group)
        first = group[0].case
        ips = {k: (r.images_per_s if r.ok else None) for k, r in by.items()}
        torch_ips = ips.get("torch")
        row = [first.arch, first.mode, str(first.image_size), str(first.batch), fmt(torch_ips), fmt(ips.get("flax")),
               fmt(ips.get("flax-fast")), fmt(ratio(ips.get("flax"), torch_ips), ".2f"),
               fmt(ratio(ips.get("flax-fast"), torch_ips), ".2f"),
               fmt(ratio(ips.get("flax-fast"), ips.get("flax-fast-xlaconv")), ".2f", "-")]
        if with_compile:
            row += [fmt(ips.get("torch.compile")), fmt(ratio(ips.get("flax-fast"), ips.get("torch.compile")), ".2f")]
        row += [", ".join(_compile_s(by.get(k)) for k in compiled), ", ".join(_mem(by.get(k)) for k in memory),
                _share(foreign_cpu(group))]
        rows.append(row)
    return drop_empty_columns(header, rows, {"flax img/s", "flax/torch", "conv lever"})


def drop_empty_columns(header: list[str], rows: list[list[str]], optional: set[str]
                       ) -> tuple[list[str], list[list[str]]]:
    """Remove the ``optional`` columns that are "n/a" in every row (e.g. plain Flax under ``--quick``)."""
    keep = [i for i, name in enumerate(header)
            if name not in optional or any(r[i] not in ("n/a", "-") for r in rows)]
    return [header[i] for i in keep], [[r[i] for i in keep] for r in rows]


def lever_rows(groups: Sequence[Sequence[Result]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the lever study: each Flax variant's speed relative to PyTorch and to plain Flax."""
    header = ["arch", "mode", "batch", "lever", "img/s", "vs torch", "vs plain flax", "compile s", "other procs CPU"]
    rows = []
    for group in groups:
        by = _by_impl(group)
        torch_ips = by["torch"].images_per_s if "torch" in by and by["torch"].ok else None
        plain = by.get("plain")
        plain_ips = plain.images_per_s if plain is not None and plain.ok else None
        for r in group:
            ips = r.images_per_s if r.ok else None
            rows.append([r.case.arch, r.case.mode, str(r.case.batch), r.case.impl, fmt(ips),
                         fmt(ratio(ips, torch_ips), ".2f"), fmt(ratio(ips, plain_ips), ".2f"),
                         fmt(r.ready.get("compile_s") if r.ok else None), _share(foreign_cpu([r]))])
    return header, rows


def _share(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}%"


def pipeline_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the input pipeline against torchvision's DataLoader (steady img/s, first epoch s)."""
    header = ["num_workers", "grain img/s", "torch img/s", "grain/torch", "grain-per-epoch img/s",
              "1st epoch s (grain, torch, grain-per-epoch)"]
    rows = []
    for r in report.get("rows", []):
        ips = {k: r.get(k, {}).get("steady_images_per_s") for k in ("grain", "torch", "grain-per-epoch")}
        first = ", ".join(fmt(r.get(k, {}).get("first_epoch_s")) for k in ("grain", "torch", "grain-per-epoch"))
        rows.append([str(r["num_workers"]), fmt(ips["grain"]), fmt(ips["torch"]),
                     fmt(ratio(ips["grain"], ips["torch"]), ".2f"), fmt(ips["grain-per-epoch"]), first])
    return header, rows


def end_to_end_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the end-to-end run: wall time and final validation top-1 of each command."""
    header = ["command", "wall s", "val top-1 %", "fastest torch wall / this wall"]
    return header, [[E2E_LABELS[r["impl"]], fmt(r["wall_s"], ".0f"), fmt(r["val_top1"], ".2f"),
                     fmt(r["torch_wall_over_this"], ".2f")] for r in results_end_to_end_rows(report)]


def converter_line(report: dict[str, Any]) -> str:
    """One line summarising the converter timing."""
    if "error" in report:
        return f"converter: n/a ({report['error']})"
    return (f"converter {report['arch']} ({report['params'] / 1e6:.1f}M params): from_state_dict "
            f"{report['from_state_dict_s']:.2f} s + build_model {report['build_model_s']:.2f} s + save "
            f"{report['save_s']:.2f} s = {report['convert_total_s']:.2f} s; file {report['file_mb']:.0f} MB, "
            f"peak RSS {report['peak_rss_mb']:.0f} MB")


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
