"""Reading a grain dataset through threads or worker processes, with what grain leaves to its caller: absl flags
marked parsed, Ctrl-C left to the main process, shared memory freed on time, the iterator closed when abandoned.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from multiprocessing import shared_memory

import grain
import numpy as np

from resnet_flax.errors import first_line

logger = logging.getLogger(__name__)


def iterate(ds: grain.MapDataset, num_workers: int, start: bool = False) -> Batches:
    """The elements of ``ds`` in order, read by ``num_workers`` worker processes (threads in this process when 0);
    the workers stop when the iteration ends or is abandoned. With ``start`` the reading begins now rather than at
    the first ``next()``: the workers' start-up (each imports grain, which imports jax) overlaps whatever the
    caller does meanwhile, such as building and compiling the model."""
    batches = Batches(iter(_to_iter(ds, num_workers)))
    if start:
        batches.start()
    return batches


def _to_iter(ds: grain.MapDataset, num_workers: int) -> grain.IterDataset:
    """In-process thread prefetch for ``num_workers == 0``, else grain worker processes (same order)."""
    if num_workers <= 0:
        threads = max(1, min(8, os.cpu_count() or 1))
        return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
    _mark_absl_flags_parsed()
    per_worker = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    return per_worker.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                                  worker_init_fn=functools.partial(_init_worker, parent=os.getpid()))


def _die_with(parent: int, interval: float = 0.5) -> None:
    """End this worker within ``interval`` seconds of its parent's death, however the parent dies (SIGKILL, the
    OOM killer): otherwise the workers live on with ppid 1, each holding its copy of the dataset.

    A watchdog thread, not prctl(PR_SET_PDEATHSIG): that signal follows the parent *thread* that started the
    worker (one of grain's pool threads), which ends before the workers have freed their shared memory."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _init_worker(worker_index: int, worker_count: int, parent: int) -> None:
    """Workers die with the main process, leave Ctrl-C to it (it stops them and frees their buffers in order)
    and print the training package's warnings as it does: the message alone."""
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    package = logging.getLogger("train")  # the parent of every train.* logger (the loader's skip warnings)
    package.addHandler(handler)
    package.propagate = False


def _unlink_shared_memory(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Free the names of the shared-memory blocks a worker's batch arrives in, now rather than at grain's leisure.

    grain unlinks them from a background thread when the arrays are collected, which may not run before the
    process exits (a "leaked shared_memory" warning each run). The arrays stay valid: unlinking removes the
    name, and the memory goes when the arrays do.
    """
    for array in batch.values():
        shm = getattr(array, "shm", None)
        # ``_unlink_on_del`` is grain's private flag (SharedMemoryArray): grain has ``unlink_on_del()`` to set it
        # but no public way to read or clear it, nor to unlink a block early.
        if isinstance(shm, shared_memory.SharedMemory) and getattr(array, "_unlink_on_del", False):
            shm.unlink()
            # Cleared so grain's collector only unmaps: a second unlink of the name would fail.
            array._unlink_on_del = False
    return batch


def _mark_absl_flags_parsed() -> None:
    """grain's multiprocessing reads absl flags; outside ``absl.app`` they must be marked parsed first."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class Batches(Iterator[dict[str, np.ndarray]]):
    """A grain iterator's batches; its worker processes stop when it is exhausted, closed or collected."""

    def __init__(self, iterator: grain.DatasetIterator) -> None:
        self._iterator: grain.DatasetIterator | None = iterator

    def start(self) -> None:
        """Start the workers and their prefetching now (grain's ``start_prefetch``)."""
        if self._iterator is not None:
            self._iterator.start_prefetch()

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            raise StopIteration
        try:
            return _unlink_shared_memory(next(self._iterator))
        except BaseException:  # the end, an error in a worker, Ctrl-C: the workers stop with it
            self.close()
            raise

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        iterator, self._iterator = self._iterator, None
        close = getattr(iterator, "close", None)
        if close is not None:
            try:
                close()
            except Exception as e:
                logger.debug("closing the grain iterator failed: %s", first_line(e))

    def __del__(self) -> None:
        self.close()
