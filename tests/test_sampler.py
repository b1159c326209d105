"""Repeated augmentation (``--ra-reps``) against torchvision's ``RASampler``: the same index order for the same
permutation (each replica's, batched as its DataLoader batches it), the epoch's length, a draw of its own for each
copy, host shares, and a resumed run reading the same batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train import pipeline
from train.pipeline import RepeatedOrder, RunData, make_loader, steps_per_epoch
from train.schedule import Position, Schedule
from train.sources import Splits, SyntheticSource


def rasampler(n: int, reps: int, num_replicas: int, rank: int, permutation: torch.Tensor) -> list[int]:
    """The indices torchvision's ``RASampler`` (``references/classification/sampler.py``) yields to ``rank`` in an
    epoch whose ``torch.randperm`` gave ``permutation``: each index ``reps`` times in a row, the list padded from its
    start to a multiple of the replicas, every ``num_replicas``-th element from ``rank``, the first
    ``floor(n // 256 * 256 / num_replicas)`` of those."""
    repeated = permutation.repeat_interleave(reps)
    total = math.ceil(n * reps / num_replicas) * num_replicas
    padded = torch.cat([repeated, repeated[: total - len(repeated)]])
    return padded[rank:total:num_replicas][: math.floor(n // 256 * 256 / num_replicas)].tolist()


def reference_batches(n: int, reps: int, num_replicas: int, batch_size: int, permutation: np.ndarray) -> list:
    """torchvision's global batches: each replica's DataLoader batch k (its sampler's order), replica 0 first;
    only full batches (a run drops the last partial one)."""
    local = batch_size // num_replicas
    loaders = [list(torch.utils.data.DataLoader(range(n), batch_size=local, sampler=rasampler(
        n, reps, num_replicas, rank, torch.from_numpy(permutation)))) for rank in range(num_replicas)]
    full = min(sum(len(b) == local for b in batches) for batches in loaders)
    return [torch.cat([loaders[r][k] for r in range(num_replicas)]).tolist() for k in range(full)]


@pytest.mark.parametrize("n, reps, replicas, batch", [(1000, 4, 1, 64), (1000, 4, 4, 64), (700, 3, 2, 30),
                                                      (300, 4, 8, 16), (5000, 3, 3, 48), (256, 2, 1, 256)])
def test_order_is_rasamplers_for_the_same_permutation(n, reps, replicas, batch):
    order = RepeatedOrder(n, reps, replicas, batch, seed=7, epoch=2)
    want = reference_batches(n, reps, replicas, batch, pipeline._permutation(7, 2, n))
    items = [order(p) for p in range(order.num_batches * batch)]
    got = [[index for index, _ in items[k * batch:(k + 1) * batch]] for k in range(order.num_batches)]
    assert got == want and order.num_batches == len(want) == steps_per_epoch(n, batch, True, reps, replicas)
    assert len(set(items)) == len(items)  # every copy of an example has its own draw
    assert sorted(np.unique([i for i, _ in items], return_counts=True)[1])[-1] <= reps


def test_an_epoch_is_rounded_down_to_256_images_and_refused_below():
    """RASampler's epoch: the images rounded down to a multiple of 256, shared by the replicas (rounded down);
    fewer than 256 images or one batch per device is one line naming the fix."""
    assert [steps_per_epoch(n, 32, True, 4, 1) for n in (255, 256, 511, 512, 1300)] == [0, 8, 8, 16, 40]
    assert steps_per_epoch(1300, 32, True, 4, 8) == 1280 // 8 // 4 == 40
    with pytest.raises(pipeline.DataError, match=r"--ra-reps 4.*256") as e:
        pipeline.build_epoch_dataset(SyntheticSource(255, 1000, 8), batch_size=8, image_size=8, train=True, seed=0,
                                     ra_reps=4)
    assert "\n" not in str(e.value)


SOURCE = SyntheticSource(300, 1000, image_size=8)  # label = index: the batches name their examples


def _loader(**kw) -> list[dict[str, np.ndarray]]:
    common = {"batch_size": 16, "image_size": 8, "train": True, "seed": 3, "epoch": 1, "normalize": False,
              "ra_reps": 4, "num_replicas": 2}
    return list(make_loader(SOURCE, **{**common, **kw}))


def test_batches_follow_the_order_with_each_copy_augmented_its_own_way():
    """The pipeline's examples are the order's, host shares add up to the global batch, and the copies of an
    example (the same label) get different crops."""
    batches = _loader()
    want = reference_batches(300, 4, 2, 16, pipeline._permutation(3, 1, 300))
    assert [b["label"].tolist() for b in batches] == want
    hosts = [_loader(process_index=p, process_count=2) for p in range(2)]
    for k, batch in enumerate(batches):
        np.testing.assert_array_equal(np.concatenate([hosts[0][k]["image"], hosts[1][k]["image"]]), batch["image"])
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    copies = [images[labels == label] for label in np.unique(labels)]
    assert all(len(c) == 4 for c in copies[:10])
    assert all(not np.array_equal(c[0], c[1]) for c in copies[:10])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_resumed_run_reads_the_same_batches(num_workers):
    """Resumed at epoch 1, batch 5 (the run-long reader, through workers or not): the uninterrupted run's batches
    from there, across the epoch end into epoch 2."""
    spe = steps_per_epoch(300, 16, True, 4, 2)
    segments = Schedule(spe, 2 * spe + 3).segments(Position(spe + 5, 1, 5))
    splits = Splits(train=SOURCE, val=SyntheticSource(4, 1000, image_size=8))
    run = RunData(splits, segments, batch_size=16, image_size=8, seed=3, num_workers=num_workers, ra_reps=4,
                  num_replicas=2)
    try:
        got = [list(run.val() if s.kind == "val" else run.train(s.epoch, s.start)) for s in segments]
    finally:
        run.close()
    train = [g for g, s in zip(got, segments) if s.kind == "train"]
    assert [len(t) for t in train] == [spe - 5, 3]
    for resumed, full in zip(train, [_loader()[5:], _loader(epoch=2)[:3]]):
        for a, b in zip(resumed, full):
            for key in b:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
