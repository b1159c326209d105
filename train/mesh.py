"""The device mesh, its shardings, and moving host batches onto it ahead of the step that needs them."""

from __future__ import annotations

import collections
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh() -> tuple[NamedSharding, NamedSharding]:
    """(replicated, batch-sharded) shardings over a 1-D ``data`` mesh of every device of every host."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This host's share of the batch -> global arrays sharded over the mesh (no copy between hosts)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items() if k != "corrupt"}


def prefetch(batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding, size: int = 2
             ) -> Iterator[tuple[dict[str, jax.Array], int]]:
    """(global batch, unreadable images in it), keeping ``size`` batches already on the devices."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append((to_global(batch, sharding), int(batch["corrupt"].sum()) if "corrupt" in batch else 0))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
