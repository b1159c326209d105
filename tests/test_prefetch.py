"""train.mesh.prefetch: the loader's batches on the devices, in order, from a thread of its own."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from train.mesh import make_mesh, prefetch


def loader(n: int, fail_at: int | None = None, closed: list | None = None):
    """``n`` batches of 4 images whose pixels are the batch's index; raises at ``fail_at``; notes its closing."""
    try:
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"batch {i} cannot be read")
            yield {"image": np.full((4, 2, 2, 3), i, np.float32), "label": np.full(4, i, np.int32),
                   "corrupt": np.array([i % 2, 0, 0, 0])}
    finally:
        if closed is not None:
            closed.append(True)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "prefetch"]


def test_batches_arrive_in_order_on_the_devices_with_their_unreadable_counts():
    _, batch_sharding = make_mesh()
    got = [(int(b["image"][0, 0, 0, 0]), int(b["label"][3]), bad, b["image"].sharding == batch_sharding)
           for b, bad in prefetch(loader(7), batch_sharding)]
    assert got == [(i, i, i % 2, True) for i in range(7)]
    assert not prefetch_threads()


def test_a_loader_error_is_raised_to_the_loop_after_the_batches_before_it():
    _, batch_sharding = make_mesh()
    seen = []
    with pytest.raises(ValueError, match="batch 3 cannot be read"):
        for b, _ in prefetch(loader(7, fail_at=3), batch_sharding):
            seen.append(int(b["image"][0, 0, 0, 0]))
    assert seen == [0, 1, 2]
    assert not prefetch_threads()


def test_leaving_the_loop_early_stops_the_thread_and_closes_the_loader():
    _, batch_sharding = make_mesh()
    closed: list = []
    batches = prefetch(loader(100, closed=closed), batch_sharding)
    for i, _ in enumerate(batches):
        if i == 1:
            break
    batches.close()  # what the loop's generator gets when a preemption or an error leaves it
    assert closed == [True]
    assert not prefetch_threads()


def test_the_thread_reads_at_most_size_batches_ahead_of_the_one_in_use():
    _, batch_sharding = make_mesh()
    read: list = []

    def counting():
        for batch in loader(20):
            read.append(1)
            yield batch

    batches = prefetch(counting(), batch_sharding, size=2)
    next(batches)
    deadline = time.monotonic() + 10
    while len(read) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # room for a read too many
    assert len(read) == 3  # the batch in use and two ahead, as the step's memory is sized for
    batches.close()
    assert not prefetch_threads()
