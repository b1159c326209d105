"""``python -m train --compile-only --topology v5e:2x4``: the run's steps compiled for a TPU and sized, no TPU needed.

The mesh, shardings and jitted ``train_step``/``eval_step`` come from the functions the real run calls, over
the devices of a TPU topology that libtpu describes without the hardware (:mod:`.chips`). The state is built
abstractly, then both steps are lowered and compiled (:mod:`.compile`) and the executables report memory,
FLOPs and collectives (:mod:`.count`, :mod:`.report`); a batch that does not fit is followed by a search for
the largest that does (:mod:`.search`). ``python -m train`` never loads libtpu for this: :func:`run_isolated`
re-runs the command as ``python -m train.tpu_sizing`` (:func:`main`) in a child with :data:`ISOLATION_ENV`,
under ``unshare -n`` (no network) where the kernel allows it (:mod:`.isolate`).

Importing this package imports neither JAX nor libtpu: each function imports what it needs when called.
"""

from train.tpu_sizing.chips import CHIPS, Chip, chip_hbm, chip_of, topology_devices
from train.tpu_sizing.cli import main
from train.tpu_sizing.compile import SCHEDULE_STEPS, Compiled, OutOfMemory, compile_steps, out_of_memory
from train.tpu_sizing.count import collectives, forward_flops, summarise_collectives
from train.tpu_sizing.isolate import ISOLATION_ENV, accelerator_type, isolation_env, no_network_prefix, run_isolated
from train.tpu_sizing.report import (
    REPORT_FILE,
    build_report,
    cost,
    fixed_bytes,
    format_report,
    memory,
    shardings,
    write_report,
)
from train.tpu_sizing.search import largest_fitting_batch, search_largest_batch, train_step_bytes

__all__ = [
    "CHIPS",
    "ISOLATION_ENV",
    "REPORT_FILE",
    "SCHEDULE_STEPS",
    "Chip",
    "Compiled",
    "OutOfMemory",
    "accelerator_type",
    "build_report",
    "chip_hbm",
    "chip_of",
    "collectives",
    "compile_steps",
    "cost",
    "fixed_bytes",
    "format_report",
    "forward_flops",
    "isolation_env",
    "largest_fitting_batch",
    "main",
    "memory",
    "no_network_prefix",
    "out_of_memory",
    "run_isolated",
    "search_largest_batch",
    "shardings",
    "summarise_collectives",
    "topology_devices",
    "train_step_bytes",
    "write_report",
]
