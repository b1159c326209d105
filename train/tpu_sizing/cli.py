"""The isolated child of ``python -m train --compile-only``: compile, report, and search when it does not fit."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence

from train.tpu_sizing.chips import chip_hbm, topology_devices
from train.tpu_sizing.compile import OutOfMemory, compile_steps
from train.tpu_sizing.isolate import isolation_env
from train.tpu_sizing.report import build_report, format_report, gib, write_report
from train.tpu_sizing.search import search_largest_batch


def main(argv: Sequence[str] | None = None) -> int:
    """The child: compile, print the report, exit 2 (with the largest batch that fits) when it does not fit."""
    from train.config import parse_config

    cfg = parse_config(argv)
    os.environ.update(isolation_env(cfg.topology, {}))  # before libtpu loads (at the topology query)
    import jax

    jax.config.update("jax_platforms", "cpu")  # jax was imported (by the config) before the env was set
    from resnet_flax.errors import WeightsError
    from train.errors import DataError, RunError
    from train.sources import count_classes

    try:
        devices = topology_devices(cfg.topology)
        num_classes = count_classes(cfg.dataset, cfg.data_dir, str(cfg.tfds_data_dir) if cfg.tfds_data_dir else None)
        try:
            compiled = compile_steps(cfg, devices, num_classes)
        except OutOfMemory as e:
            report = {"topology": cfg.topology, "global_batch": cfg.batch_size, "fits": False, "xla_error": str(e),
                      "memory": {"train": {"total": e.used}}, "hbm_per_device": chip_hbm(devices)}
        else:
            report = build_report(cfg, cfg.topology, devices, compiled, num_classes)
            print(format_report(report), flush=True)
    except (DataError, RunError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report["fits"] is False:
        print(f"--batch-size {cfg.batch_size} does not fit in {gib(report['hbm_per_device'])} a device; searching "
              "for the largest global batch that does, one compile a try:", flush=True)
        report["largest_fitting_batch"] = search_largest_batch(cfg, devices, num_classes, report,
                                                               lambda line: print(line, flush=True))
    write_report(cfg.workdir, report)
    if report["fits"] is False:
        largest = report["largest_fitting_batch"]
        fix = f"pass --batch-size {largest} or less (the largest global batch that fits)" if largest else \
            f"not even {len(devices)} (one image per device) fits: use a larger slice"
        needs = max(m["total"] for m in report["memory"].values())
        needs_text = gib(needs) if math.isfinite(needs) else "more HBM than it has"
        print(f"error: --batch-size {cfg.batch_size} needs {needs_text} per device, more than the "
              f"{gib(report['hbm_per_device'])} of HBM on {cfg.topology}; {fix}", file=sys.stderr)
        return 2
    return 0
