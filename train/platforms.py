"""Which JAX backends a command may load: libtpu stays out on a machine without a TPU chip."""

from __future__ import annotations

import os


def leave_out_absent_tpu() -> None:
    """Drop JAX's TPU backend when no TPU chip is attached and nothing asked for one.

    With libtpu installed (the ``[tpu]`` extra, e.g. for ``--compile-only``) on a CPU or GPU machine, JAX
    still loads libtpu at its first device query, and libtpu prints initialisation errors on stderr before
    JAX falls back. ``JAX_PLATFORMS`` or ``JAX_FORCE_TPU_INIT`` keep JAX's own choice. Call before the first
    device query.
    """
    if os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_FORCE_TPU_INIT"):
        return
    try:
        from jax._src import hardware_utils, xla_bridge
    except ImportError:  # JAX's internals moved: keep its default
        return
    factories = getattr(xla_bridge, "_backend_factories", None)
    if isinstance(factories, dict) and "tpu" in factories and \
            hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
        factories.pop("tpu")
