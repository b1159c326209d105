"""The device mesh, its shardings, and moving host batches onto it ahead of the step that needs them."""

from __future__ import annotations

import collections
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
    """(global batch, unreadable images in it), keeping ``size`` batches already on the devices."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append((to_global(batch, sharding), int(batch["corrupt"].sum()) if "corrupt" in batch else 0))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
