"""Which JAX backends a command may load: libtpu stays out on a machine without a TPU chip."""

from __future__ import annotations

import importlib.util
import os
import pkgutil
from pathlib import Path

_GOOGLE_PCI_VENDOR = "0x1ae0"
_PCI_DEVICES = Path("/sys/bus/pci/devices")


def tpu_chip_attached(pci_devices: Path = _PCI_DEVICES) -> bool | None:
    """Whether a TPU chip sits on this machine's PCI bus; None when the bus cannot be read (no sysfs: not Linux).

    A TPU is a Google (vendor 0x1ae0) PCI device; Google's other PCI devices on Cloud VMs are network (gVNIC)
    and storage (NVMe) controllers, so any Google device of another class counts as a chip: a TPU generation
    newer than this code is still seen.
    """
    try:
        devices = list(pci_devices.iterdir())
    except OSError:
        return None
    for device in devices:
        try:
            vendor = (device / "vendor").read_text().strip()
            if vendor != _GOOGLE_PCI_VENDOR:
                continue
            pci_class = (device / "class").read_text().strip()
        except OSError:
            return None
        if not pci_class.startswith(("0x01", "0x02")):  # not a mass-storage or network controller
            return True
    return False


def _jax_plugins_installed() -> bool:
    """Whether JAX will find a PJRT plugin (CUDA, ROCm, ...): JAX's documented discovery, without loading any."""
    from importlib.metadata import entry_points

    if os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS") or list(entry_points(group="jax_plugins")):
        return True
    spec = importlib.util.find_spec("jax_plugins")
    return spec is not None and any(pkgutil.iter_modules(spec.submodule_search_locations or []))


def leave_out_absent_tpu() -> None:
    """Keep JAX's TPU backend (libtpu) out when no TPU chip is attached and nothing asked for one.

    With libtpu installed (the ``[tpu]`` extra, e.g. for ``--compile-only``) on a CPU or GPU machine, JAX
    still loads libtpu at its first device query, and libtpu prints initialisation errors on stderr before
    JAX falls back. ``JAX_PLATFORMS`` or ``JAX_FORCE_TPU_INIT`` keep JAX's own choice, as does a PCI bus this
    cannot read. Call before the first device query.

    Without a TPU chip and without a PJRT plugin, the CPU is the only platform JAX can have, so this sets
    ``jax_platforms`` to ``cpu`` (public config). With a plugin (a GPU machine) the platforms it provides are
    named only when JAX loads it, and naming an absent platform in ``jax_platforms`` makes JAX fail; so there
    the TPU factory is replaced by one that provides nothing, through ``jax.extend.backend`` (public, though
    without JAX's compatibility guarantee: if it changes, JAX's own choice stands).
    """
    if os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_FORCE_TPU_INIT"):
        return
    if tpu_chip_attached() is not False:
        return
    import jax

    if not _jax_plugins_installed():
        jax.config.update("jax_platforms", "cpu")
        return
    try:
        from jax.extend.backend import register_backend_factory

        register_backend_factory("tpu", lambda: None, fail_quietly=True)  # JAX skips a backend that is None
    except Exception:  # the API changed, or backends already initialised: JAX's default (libtpu prints)
        pass
