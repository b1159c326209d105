"""Converter time for the largest model: torchvision state_dict -> Flax model -> ``.flax.safetensors``.

``python -m benchmarks.converter`` builds torchvision's ``wide_resnet101_2`` (random weights: nothing is
downloaded), then times ``convert.from_state_dict``, ``convert.build_model`` and ``resnet_flax.save`` and
prints one ``@@bench`` JSON line with the phase times, the file size and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import results
from benchmarks.worker import REPLY_PREFIX, peak_rss_mb


def run(arch: str) -> dict[str, Any]:
    """Time each conversion phase for ``arch``."""
    import torch
    import torchvision

    import convert
    import resnet_flax

    torch.manual_seed(0)
    t0 = time.perf_counter()
    state_dict = getattr(torchvision.models, arch)().state_dict()
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpt = convert.from_state_dict(state_dict)
    map_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = convert.build_model(ckpt)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        path = Path(tmp) / f"{arch}.flax.safetensors"
        t0 = time.perf_counter()
        resnet_flax.save(model, path)
        save_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 2**20
    return {"arch": arch, "params": ckpt.num_params, "torchvision_init_s": init_s, "from_state_dict_s": map_s,
            "build_model_s": build_s, "save_s": save_s, "convert_total_s": map_s + build_s + save_s,
            "file_mb": size_mb, "peak_rss_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.converter``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="wide_resnet101_2")
    results.add_arguments(p)
    args = p.parse_args(argv)
    report = run(args.arch)
    results.save(args, results.record("converter", results.command_line("benchmarks.converter", argv or sys.argv[1:]),
                                      results.converter_rows(report), raw=report))
    sys.stdout.write(REPLY_PREFIX + json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
