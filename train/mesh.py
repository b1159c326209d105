"""The device mesh, its shardings, and moving host batches onto it ahead of the step that needs them."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PREFETCH_BATCHES = 2  # batches kept on the devices ahead of the step (--compile-only counts them too)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> tuple[NamedSharding, NamedSharding]:
    """(replicated, batch-sharded) shardings over a 1-D ``data`` mesh of ``devices`` (default: all, all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def check_batch_size(batch_size: int, sharding: NamedSharding) -> None:
    """The global batch must split evenly over the mesh's devices."""
    from train.errors import RunError

    n = sharding.mesh.size
    if batch_size % n:
        raise RunError(f"--batch-size {batch_size} is not divisible by the {n} devices; use a multiple of {n}")


def device_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The entries of a loader batch that go to the devices (``corrupt`` is a host-side count)."""
    return {k: v for k, v in batch.items() if k != "corrupt"}


def batch_spec(batch_size: int, image_size: int, sharding: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and sharding of the global batch a run's steps receive (from the run loader's own example)."""
    from train.pipeline import RunData

    example = device_batch(RunData.padding_example(image_size))
    return {k: jax.ShapeDtypeStruct((batch_size, *np.shape(v)), np.asarray(v).dtype, sharding=sharding)
            for k, v in example.items()}


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This host's share of the batch -> global arrays sharded over the mesh (no copy between hosts)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in device_batch(batch).items()}


def prefetch(batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding, size: int = PREFETCH_BATCHES
             ) -> Iterator[tuple[dict[str, jax.Array], int]]:
    """(global batch, unreadable images in it), keeping ``size`` batches already on the devices.

    A thread of its own reads the loader and moves its batches onto the devices, so that work overlaps the step
    even when JAX runs the step on the calling thread (:mod:`train.host_memory`). Batches come in the loader's
    order; an error in the loader is raised here; leaving the loop early stops the thread and closes the loader.
    """
    ready: queue.Queue = queue.Queue(maxsize=max(size - 1, 1))  # plus the one the thread holds: ``size`` ahead
    stop = threading.Event()

    def put(item: object) -> bool:
        """Queue ``item`` unless the consumer stops first (seen within a tenth of a second); whether it went in."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put((to_global(batch, sharding), int(batch["corrupt"].sum()) if "corrupt" in batch else 0)):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, which raises it
            put(_Failed(e))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
        close = getattr(batches, "close", None)
        if close is not None:
            close()


_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error
