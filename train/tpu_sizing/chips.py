"""TPU chips: each generation's specs, and the devices of a topology as libtpu describes it (no TPU needed)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's peak bf16 FLOP/s, HBM capacity (bytes) and HBM bandwidth (bytes/s)."""

    name: str
    peak_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    source: str


# Per chip, from each generation's "System architecture" table in the Google Cloud TPU docs
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e); capacities in the docs' own units (GiB for v4, GB else).
CHIPS = {
    "TPU v4": Chip("v4", 275e12, 32 * 2**30, 1200e9, "cloud.google.com/tpu/docs/v4"),
    "TPU v5 lite": Chip("v5e", 197e12, 16e9, 819e9, "cloud.google.com/tpu/docs/v5e"),
    "TPU v5": Chip("v5p", 459e12, 95e9, 2765e9, "cloud.google.com/tpu/docs/v5p"),
    "TPU v6 lite": Chip("v6e", 918e12, 32e9, 1638e9, "cloud.google.com/tpu/docs/v6e"),
}
ACCELERATOR_TYPES = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}  # topology prefix -> type
CORES_PER_CHIP = {"v4": 2, "v5p": 2}  # accelerator types count TensorCores on these


def topology_devices(name: str) -> list:
    """The devices of TPU topology ``name`` (e.g. ``v5e:2x4``, ``v5p:2x2x1``), described by libtpu."""
    from jax.experimental import topologies

    from train.errors import RunError

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # libtpu missing or a name it rejects
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"--topology {name}: {msg}; give one like v5e:2x4, v5p:2x2x1, v6e:4x4 or v4:2x2x1 "
                       "(needs libtpu: pip install -e '.[tpu]')") from None


def chip_of(devices: Sequence) -> tuple[Chip | None, int]:
    """(the chip's specs, devices per chip): v4 topologies list each TensorCore as a device."""
    chip = CHIPS.get(devices[0].device_kind)
    chips = len({tuple(getattr(d, "coords", (d.id,))) for d in devices})
    return chip, max(1, len(devices) // max(chips, 1))


def chip_hbm(devices: Sequence) -> float | None:
    """HBM bytes per device (a v4 chip's two TensorCores share its HBM)."""
    chip, per_chip = chip_of(devices)
    return chip.hbm_bytes / per_chip if chip else None
