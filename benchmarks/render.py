"""``python -m benchmarks.render``: regenerate the tables in docs/ from the result files in benchmarks/results/.

A table in a page is a block between two marker comments naming its result file::

    <!-- results: benchmarks/results/sweep-amd-epyc-avx2-2c.json -->
    ...generated: the host, versions, command and date, then the table...
    <!-- /results -->

``python -m benchmarks.render`` rewrites every such block from its file; ``--check`` changes nothing and exits
1 when a page differs from what its files render or a result file is in no page (tests/test_benchmarks.py
runs it). To publish a new measurement: run the benchmark command (it writes ``benchmarks/results/KIND-TAG.json``),
add a marker pair for a new file, run this command, commit both.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.results import E2E_LABELS

ROOT = Path(__file__).resolve().parent.parent
PAGES = (ROOT / "docs" / "performance.md", ROOT / "docs" / "tpu-sizing.md", ROOT / "docs" / "parity.md")
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- results: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)
MODES = {"infer": "inference", "train": "train step"}


def num(value: float | None, missing: str = "n/a") -> str:
    """An images/s-like figure: whole numbers as recorded, thousands without decimals, else one decimal."""
    if value is None:
        return missing
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}"


def ratio(value: float | None, bold: bool = False, missing: str = "n/a") -> str:
    """A ratio to two decimals, bold from 1.00 up when ``bold`` (where Flax is at least as fast)."""
    if value is None:
        return missing
    text = f"{value:.2f}"
    return f"**{text}**" if bold and round(value, 2) >= 1.0 else text


def share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], optional: Sequence[str] = ()) -> str:
    """A GitHub-markdown table, leaving out the ``optional`` columns that are empty in every row."""
    keep = [i for i, h in enumerate(header) if h not in optional or any(r[i] not in ("", "n/a", "-") for r in rows)]
    lines = ["| " + " | ".join(header[i] for i in keep) + " |", "|" + "|".join("---" for _ in keep) + "|"]
    lines += ["| " + " | ".join(r[i] for i in keep) + " |" for r in rows]
    return "\n".join(lines)


def _impls(rows: Sequence[dict[str, Any]], field: str, order: Sequence[str]) -> list[str]:
    present = {k for r in rows for k in r.get(field, {})}
    return [k for k in order if k in present]


def models_table(rows: Sequence[dict[str, Any]]) -> str:
    """``python -m benchmarks`` (and ``--sweep``): one row per workload, the implementations side by side."""
    order = ("torch", "flax", "flax-fast", "torch.compile")
    compiled = _impls(rows, "compile_s", ("flax", "flax-fast", "torch.compile"))
    peaks = _impls(rows, "peak_mb", order)
    device = any(r.get("memory") == "device" for r in rows)
    header = ["arch", "mode", "px", "batch", "torch img/s", "flax img/s", "flax-fast img/s", "flax / torch",
              "flax-fast / torch", "conv lever", "torch.compile img/s", "flax-fast / torch.compile",
              f"compile s ({', '.join(compiled)})", f"peak {'device' if device else 'RSS'} MB ({', '.join(peaks)})",
              "other procs CPU"]
    out = []
    for r in rows:
        ips, q = r.get("images_per_s", {}), dict(r.get("ratios", {}))
        for name, (a, b) in {"flax/torch": ("flax", "torch"), "flax-fast/torch": ("flax-fast", "torch"),
                             "flax-fast/torch.compile": ("flax-fast", "torch.compile")}.items():
            if name not in q and ips.get(a) and ips.get(b):  # files that kept only img/s
                q[name] = ips[a] / ips[b]
        lever = q.get("conv_lever")
        out.append([r["arch"], MODES.get(r["mode"], r["mode"]), str(r["image_size"]), str(r["batch"]),
                    num(ips.get("torch")), num(ips.get("flax"), ""), num(ips.get("flax-fast")),
                    ratio(q.get("flax/torch"), missing=""), ratio(q.get("flax-fast/torch"), bold=True),
                    "-" if lever is None else f"{lever:.1f}x", num(ips.get("torch.compile"), ""),
                    ratio(q.get("flax-fast/torch.compile"), missing=""),
                    ", ".join(num(r.get("compile_s", {}).get(k), "-") for k in compiled) if compiled else "",
                    ", ".join(num(r.get("peak_mb", {}).get(k), "-") for k in peaks) if peaks else "",
                    "" if r.get("other_cpu") is None else share(r["other_cpu"])])
    return table(header, out, optional=header[5:])


def levers_table(rows: Sequence[dict[str, Any]]) -> str:
    """``python -m benchmarks --levers``: each Flax lever's speed against PyTorch, plain Flax and its base."""
    header = ["arch", "mode", "px", "batch", "lever", "img/s", "vs torch", "vs plain Flax", "vs the lever before +",
              "compile s", "other procs CPU"]
    out = []
    for r in rows:
        base = f"{r['vs_base']:.2f}x (`{r['base']}`)" if r.get("vs_base") is not None else ""
        out.append([r["arch"], MODES.get(r["mode"], r["mode"]), str(r["image_size"]), str(r["batch"]),
                    f"`{r['lever']}`", num(r.get("images_per_s"), ""), ratio(r.get("vs_torch"), missing=""),
                    "" if r.get("vs_plain") is None else f"{r['vs_plain']:.2f}x", base,
                    num(r.get("compile_s"), ""), "" if r.get("other_cpu") is None else share(r["other_cpu"])])
    return table(header, out, optional=header[5:])


def pipeline_table(rows: Sequence[dict[str, Any]]) -> str:
    """``python -m benchmarks.pipeline``: steady img/s per loader and worker count."""
    header = ["workers", "grain (one iterator a run) img/s", "torch DataLoader img/s", "grain / torch",
              "grain, a loader per epoch img/s", "1st epoch s (grain, torch)"]
    out = []
    for r in rows:
        ips, first = r.get("images_per_s", {}), r.get("first_epoch_s", {})
        q = r.get("grain/torch")
        if q is None and ips.get("grain") and ips.get("torch"):
            q = ips["grain"] / ips["torch"]
        out.append([str(r["num_workers"]), num(ips.get("grain")), num(ips.get("torch")), ratio(q, bold=True),
                    num(ips.get("grain-per-epoch"), ""),
                    ", ".join(num(first.get(k), "-") for k in ("grain", "torch")) if first else ""])
    return table(header, out, optional=header[4:])


def end_to_end_table(rows: Sequence[dict[str, Any]]) -> str:
    """``python -m benchmarks.end_to_end``: the whole command's wall time and final validation top-1."""
    out = [[E2E_LABELS.get(r["impl"], r["impl"]), num(r.get("wall_s")),
            "n/a" if r.get("val_top1") is None else f"{r['val_top1']:.2f}",
            ratio(r.get("torch_wall_over_this"))] for r in rows]
    return table(["command", "wall s", "val top-1 %", "fastest PyTorch wall / this wall"], out)


def converter_table(rows: Sequence[dict[str, Any]]) -> str:
    """``python -m benchmarks.converter``: each phase of converting the largest model."""
    out = [[r["arch"], f"{r['params'] / 1e6:.1f}M", f"{r['from_state_dict_s']:.2f}", f"{r['build_model_s']:.2f}",
            f"{r['save_s']:.2f}", f"**{r['convert_total_s']:.1f}**", f"{r['file_mb']:,.0f}",
            num(r.get("peak_rss_mb"))] for r in rows]
    return table(["arch", "parameters", "read + map s", "build model s", "write file s", "total s", "file MB",
                  "peak RSS MB"], out)


def _arch(name: str) -> str:
    from resnet_flax.registry import list_models

    return f"{name} (timm)" if name in list_models("timm") else name


def parity_eval_table(rows: Sequence[dict[str, Any]]) -> str:
    """tests/test_parity.py's eval mode: max |flax - torch| / max |torch| of the logits and the stage outputs."""
    return table(["architecture", "logits", "worst of the four stage outputs"],
                 [[_arch(r["arch"]), f"{r['logits']:.1e}", f"{r['worst_stage']:.1e}"] for r in rows])


def parity_train_table(rows: Sequence[dict[str, Any]]) -> str:
    """tests/test_parity.py's train step: each quantity against PyTorch float32, and each side against float64."""
    keys = ("logits", "grads (global)", "grads (worst tensor)", "running stats")

    def cell(c: dict[str, float]) -> str:
        return f"{c['vs_torch']:.1e} ({c['flax_vs_f64']:.1e} / {c['torch_vs_f64']:.1e})"

    return table(["architecture", "logits", "gradients, global (max \\|diff\\| / max \\|grad\\|)",
                  "worst single gradient tensor", "running stats"],
                 [[_arch(r["arch"]), *(cell(r[k]) for k in keys)] for r in rows])


def first_step_table(rows: Sequence[dict[str, Any]]) -> str:
    """``python -m benchmarks.first_step``: seconds from ``python -m train``'s start to its first finished step."""
    out = [[("cold (empty folder)" if r["cache"] == "cold" else "warm"),
            f"{r['workers']} " + ("(threads in the main process)" if r["workers"] == 0 else "processes"),
            ", ".join(f"{s:.2f}" for s in r["seconds"]), f"**{r['median_s']:.1f}**"] for r in rows]
    return table(["compilation cache", "loader workers", "first step finished s (each run)", "median s"], out)


def step_profile_table(rows: Sequence[dict[str, Any]]) -> str:
    """``python -m benchmarks.step_profile``: the train step's compiled operations by kind."""
    return table(["operation kind", "ms per step", "share"],
                 [[f"`{r['kind']}`" if not r["kind"].startswith(("other", "in no")) else r["kind"],
                   f"{r['ms_per_step']:.1f}", "" if r["share"] is None else f"{100 * r['share']:.0f} %"]
                  for r in rows])


TABLES: dict[str, Callable[[Sequence[dict[str, Any]]], str]] = {
    "sweep": models_table, "models": models_table, "levers": levers_table, "pipeline": pipeline_table,
    "end-to-end": end_to_end_table, "converter": converter_table, "parity-eval": parity_eval_table,
    "parity-train": parity_train_table, "first-step": first_step_table, "step-profile": step_profile_table}


def host_line(h: dict[str, Any]) -> str:
    """The host in words: GPU, CPU model, cores, memory, ISA extensions."""
    parts = [h["gpu"]] if h.get("gpu") else []
    if h.get("cpu"):
        numbers = (f" (family {h['cpu_family']}, model {h['cpu_model_number']})"
                   if h.get("cpu_family") is not None and str(h.get("cpu_family")) not in h["cpu"] else "")
        parts.append(h["cpu"] + numbers)
    if h.get("cores"):
        parts.append(f"{h['cores']} CPU cores")
    if h.get("memory_gib"):
        parts.append(f"{h['memory_gib']:g} GiB")
    isa = h.get("isa") or []
    if isa:
        x86 = h.get("machine", "x86_64") in ("x86_64", "AMD64")
        parts.append("ISA: " + " ".join(isa) + (" (no AVX-512)" if x86 and "avx512f" not in isa else ""))
    if not h.get("gpu"):
        parts.append("no GPU")
    return ", ".join(parts)


def caption(rec: dict[str, Any]) -> str:
    """What a reader needs to reproduce a table: host, command, versions, settings, date, provenance."""
    v = ", ".join(f"{k} {val}" for k, val in rec.get("versions", {}).items() if val)
    settings = rec.get("settings") or {}
    conditions = f" ({settings['conditions']})" if settings.get("conditions") else ""
    lines = [f"- **Host**: {host_line(rec.get('host', {}))}",
             f"- **Command**: `{rec['command']}`{conditions}",
             f"- **Versions**: {v}" if v else "",
             f"- **Measured**: {settings['measured']}" if settings.get("measured") else "",
             (f"- **Recorded**: {rec['date']}" + (f". {rec['note']}" if rec.get("note") else "")) if rec.get("date")
             else f"- **Note**: {rec.get('note') or 'no date recorded'}"]
    return "\n".join(line for line in lines if line)


def render_file(path: Path) -> str:
    """The generated text of one block: a result file's caption and table (or the TPU sizing table)."""
    data = json.loads(path.read_text())
    if isinstance(data, list):  # benchmarks/results/tpu_table.json: compile-only reports
        return tpu_block(data)
    return caption(data) + "\n\n" + TABLES[data["kind"]](data["rows"])


def tpu_block(reports: list[dict[str, Any]]) -> str:
    """The TPU sizing table as ``python -m benchmarks.tpu_table`` prints it (single-host rows, then the pod)."""
    from benchmarks import tpu_table

    by = {(r["arch"], r["topology"]): r for r in reports}
    single = [(name, by[(arch, topo)]) for name, topo in tpu_table.SLICES.items() for arch in tpu_table.ARCHS
              if (arch, topo) in by]
    pod = by.get((tpu_table.POD[0], tpu_table.POD[2]))
    return tpu_table.markdown(single, pod)


def render_page(text: str, root: Path = ROOT) -> tuple[str, set[Path]]:
    """``text`` with every results block regenerated; the result files it names."""
    used: set[Path] = set()

    def block(m: re.Match) -> str:
        path = (root / m["path"]).resolve()
        used.add(path)
        return f"{m[1]}\n{render_file(path)}\n\n{m[4]}"

    return BLOCK.sub(block, text), used


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page is out of date")
    args = p.parse_args(argv)
    stale, used = [], set()
    for page in PAGES:
        text = page.read_text()
        new, files = render_page(text)
        used |= files
        if new != text:
            stale.append(page)
            if not args.check:
                page.write_text(new)
    unused = sorted(set(RESULTS.glob("*.json")) - used)
    for path in unused:
        print(f"{path.relative_to(ROOT)}: in no page; add <!-- results: {path.relative_to(ROOT)} --> "
              f"<!-- /results --> where it belongs", file=sys.stderr)
    for page in stale:
        print(f"{page.relative_to(ROOT)}: {'out of date' if args.check else 'rewritten'}", file=sys.stderr)
    return 1 if (args.check and stale) or unused else 0


if __name__ == "__main__":
    sys.exit(main())
