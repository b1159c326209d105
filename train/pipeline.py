"""Deterministic, resumable grain loaders: one epoch of a source as batches, and every batch of a training run.

:func:`make_loader` builds one epoch as a lazy ``grain.MapDataset``: shuffle indices with a seed derived from
(seed, epoch), decode + augment each example with a generator seeded from (seed, epoch, example index),
batch into per-host sub-batches and slice out this host's share and the batches after ``start_batch``.
Nothing skipped is ever decoded, and the output does not depend on ``num_workers``. :class:`RunData` reads the
segments of a run's :class:`~train.schedule.Schedule` through one grain iterator. With repeated augmentation
(``ra_reps`` > 1) an epoch's order is torchvision's ``RASampler``'s (:class:`RepeatedOrder`), and each copy of an
example draws its own augmentation.

Batches are ``{"image": float32 [b, S, S, 3], "label": int32 [b], "mask": float32 [b], "corrupt": int32 [b]}``:
``mask`` is 0 for eval padding and unreadable images, ``corrupt`` is 1 only for unreadable images (sum it to
count skips). Training batches of uint8 images with random erasing on add ``"erase": int32 [b, 4]``, each
example's (top, left, h, w) box for the step to zero after normalising (``train.mixing.erase_boxes``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from resnet_flax.errors import first_line
from train import grain_workers
from train.augment import Augment, erase
from train.errors import DataError
from train.schedule import Segment
from train.sources import IN_MEMORY_LIMIT, BytesSource, Source, Splits, in_memory
from train.transforms import eval_crop, normalize, open_image, train_crop

logger = logging.getLogger(__name__)

_SHUFFLE_TAG = 0
_AUGMENT_TAG = 1
_REPEAT_TAG = 2


def steps_per_epoch(num_examples: int, global_batch_size: int, train: bool = True, ra_reps: int = 1,
                    num_replicas: int = 1) -> int:
    """Batches per epoch: train drops the last partial batch, eval pads it (ceil); with ``ra_reps`` > 1, the
    full batches of :class:`RepeatedOrder`'s epoch over ``num_replicas`` devices."""
    if train and ra_reps > 1:
        return RepeatedOrder(num_examples, ra_reps, num_replicas, global_batch_size, 0, 0).num_batches
    if train:
        return num_examples // global_batch_size
    return math.ceil(num_examples / global_batch_size)


@dataclass(frozen=True)
class ExampleLoader:
    """Per-example decode + augment, a picklable grain map: index -> example dict (padding/corrupt masked).

    Images are uint8 unless ``normalize`` (then float32 ``ToTensor`` + ``Normalize`` on the host). Training
    examples get ``augment``'s policy after the crop and flip and its erase box, drawn in that order from the
    example's generator (torchvision's order): the box ships as ``"erase"`` with uint8 images and is zeroed
    here in float32 ones.
    """

    source: Source
    num_examples: int
    image_size: int
    train: bool
    seed: int
    epoch: int
    resize_size: int | None = None
    normalize: bool = True
    augment: Augment | None = None

    def __call__(self, item: int | tuple[int, int]) -> dict[str, np.ndarray]:
        """The example at index ``item``, or ``(index, copy)`` under repeated augmentation."""
        index, copy = item if isinstance(item, tuple) else (item, None)
        if index >= self.num_examples:
            return self._blank(corrupt=0)
        record: dict[str, Any] = {}
        try:
            record = self.source[index]
            image = open_image(record["image"])
            box = None
            if self.train:
                rng = example_rng(self.seed, self.epoch, index, copy)
                pixels = train_crop(image, self.image_size, rng)
                if self.augment is not None:
                    pixels = self.augment.image(pixels, rng)
                    if self._erasing:
                        box = self.augment.erase_box(self.image_size, self.image_size, rng)
            else:
                pixels = eval_crop(image, self.image_size, self.resize_size)
            label = int(record["label"])
        except Exception as e:
            logger.warning("skipping unreadable image %s: %s", _describe(record, index), first_line(e))
            return self._blank(corrupt=1)
        example = {"image": normalize(pixels) if self.normalize else pixels, "label": np.int32(label),
                   "mask": np.float32(1.0), "corrupt": np.int32(0)}
        if box is not None and self.normalize:
            example["image"] = erase(example["image"], box)
        elif box is not None:
            example["erase"] = box
        return example

    @property
    def _erasing(self) -> bool:
        """Whether training examples get a random-erasing box."""
        return self.train and self.augment is not None and self.augment.random_erase > 0

    def _blank(self, corrupt: int) -> dict[str, np.ndarray]:
        """An all-zero, masked-out example (eval padding when ``corrupt=0``, unreadable image when 1)."""
        blank = {
            "image": np.zeros((self.image_size, self.image_size, 3), np.float32 if self.normalize else np.uint8),
            "label": np.int32(0),
            "mask": np.float32(0.0),
            "corrupt": np.int32(corrupt),
        }
        if self._erasing and not self.normalize:
            blank["erase"] = np.zeros(4, np.int32)
        return blank


def _describe(record: dict[str, Any], index: int) -> str:
    """The file path when the example has one, else its index."""
    if isinstance(record, dict) and "path" in record:
        return str(record["path"])
    image = record.get("image") if isinstance(record, dict) else None
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return f"#{index}"


def example_rng(seed: int, epoch: int, index: int, copy: int | None = None) -> np.random.Generator:
    """Augmentation generator for one example in one epoch (one ``copy`` of it under repeated augmentation),
    independent of batching, resume and workers."""
    return np.random.default_rng([seed % 2**64, epoch, _AUGMENT_TAG, index, *(() if copy is None else (copy,))])


@dataclass(frozen=True)
class RepeatedOrder:
    """torchvision's ``RASampler`` (``references/classification/sampler.py``) for one epoch, as the global order
    of a data-parallel run: position -> (example index, copy).

    Its list is the epoch's permutation with each index repeated ``reps`` times in a row; replica (device) d of
    ``num_replicas`` takes every ``num_replicas``-th element from d, the first ``examples // 256 * 256 /
    num_replicas`` of them (rounded down), in batches of ``batch_size / num_replicas``. Global batch k is the
    replicas' k-th batches, replica 0 first: the rows device d receives. ``copy`` is the element's place in that
    list, unique in the epoch, so each copy draws its own augmentation. (The list's wrap-around padding is never
    reached: the replicas take at most ``examples`` of its ``examples * reps`` elements.)
    """

    num_examples: int
    reps: int
    num_replicas: int
    batch_size: int  # global
    seed: int
    epoch: int

    def __post_init__(self) -> None:
        if self.reps < 1 or self.num_replicas < 1 or self.batch_size % self.num_replicas:
            raise ValueError(f"{self}: needs reps >= 1 and a batch size that splits over the replicas")

    @property
    def per_replica(self) -> int:
        """Elements each replica takes in an epoch (RASampler's ``num_selected_samples``)."""
        return math.floor(self.num_examples // 256 * 256 / self.num_replicas)

    @property
    def num_batches(self) -> int:
        """Full global batches in the epoch (the replicas' full batches)."""
        return self.per_replica // (self.batch_size // self.num_replicas)

    def __call__(self, position: int) -> tuple[int, int]:
        """(example index, copy) at ``position`` of the epoch's global order."""
        local = self.batch_size // self.num_replicas
        batch, row = divmod(position, self.batch_size)
        replica, i = divmod(row, local)
        element = replica + (batch * local + i) * self.num_replicas
        return int(_permutation(self.seed, self.epoch, self.num_examples)[element // self.reps]), element


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """Repeated augmentation's permutation of ``range(n)`` for one epoch (computed once per process)."""
    return np.random.default_rng([seed % 2**64, epoch, _REPEAT_TAG]).permutation(n)


def epoch_shuffle_seed(seed: int, epoch: int) -> int:
    """32-bit grain shuffle seed for (seed, epoch), so each epoch has its own reproducible order."""
    return int(np.random.SeedSequence([seed % 2**64, epoch, _SHUFFLE_TAG]).generate_state(1)[0])


def make_loader(
    source: Source,
    *,
    batch_size: int,
    image_size: int,
    train: bool,
    seed: int,
    epoch: int = 0,
    start_batch: int = 0,
    num_workers: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    resize_size: int | None = None,
    normalize: bool = True,
    augment: Augment | None = None,
    ra_reps: int = 1,
    num_replicas: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of this host's batches (``batch_size`` is global), starting at global batch ``start_batch``.

    A training run reads all its epochs and evaluations through one :class:`RunData` instead (its worker
    processes start once); this is the one-pass form of the same batches.
    """
    ds = build_epoch_dataset(
        source,
        batch_size=batch_size,
        image_size=image_size,
        train=train,
        seed=seed,
        epoch=epoch,
        process_index=process_index,
        process_count=process_count,
        resize_size=resize_size,
        normalize=normalize,
        augment=augment,
        ra_reps=ra_reps,
        num_replicas=num_replicas,
    )
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    ds = ds[start_batch:]
    if len(ds) == 0:
        return iter(())
    return grain_workers.iterate(ds, num_workers)


def build_epoch_dataset(
    source: Source,
    *,
    batch_size: int,
    image_size: int,
    train: bool,
    seed: int,
    epoch: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    resize_size: int | None = None,
    normalize: bool = True,
    augment: Augment | None = None,
    ra_reps: int = 1,
    num_replicas: int = 1,
) -> grain.MapDataset:
    """Lazy MapDataset of this host's sub-batches for one epoch; ``ds[k]`` is its share of global batch k.

    Training with ``ra_reps`` > 1 reads :class:`RepeatedOrder` over ``num_replicas`` devices (the run's mesh)."""
    local_batch = _local_batch_size(batch_size, process_index, process_count)
    num_examples = len(source)
    repeated = train and ra_reps > 1
    num_batches = steps_per_epoch(num_examples, batch_size, train, ra_reps, num_replicas)
    if repeated and num_batches == 0:
        raise DataError(ra_epoch_problem(num_examples, batch_size, ra_reps, num_replicas))
    if train and num_batches == 0:
        raise DataError(
            f"train split has {num_examples} examples, fewer than one global batch of {batch_size}; "
            "lower --batch-size or add data"
        )
    if repeated:
        order = RepeatedOrder(num_examples, ra_reps, num_replicas, batch_size, seed, epoch)
        indices = grain.MapDataset.range(num_batches * batch_size).map(order)
    elif train:
        indices = grain.MapDataset.range(num_examples).shuffle(seed=epoch_shuffle_seed(seed, epoch))
        indices = indices[: num_batches * batch_size]
    else:
        indices = grain.MapDataset.range(num_batches * batch_size)  # indices >= num_examples are padding
    examples = indices.map(ExampleLoader(source, num_examples, image_size, train, seed, epoch, resize_size,
                                         normalize, augment))
    return examples.batch(local_batch, drop_remainder=False)[process_index::process_count]


def ra_epoch_problem(num_examples: int, batch_size: int, ra_reps: int, num_replicas: int) -> str:
    """Why repeated augmentation leaves no full batch in an epoch, and the fix (one line)."""
    kept = RepeatedOrder(num_examples, ra_reps, num_replicas, batch_size, 0, 0).per_replica
    what = (f"--ra-reps {ra_reps}: an epoch of repeated augmentation (torchvision's RASampler) is the training images "
            f"rounded down to a multiple of 256, here {num_examples // 256 * 256} of {num_examples}")
    if kept == 0:
        return f"{what}; add images or drop --ra-reps"
    return (f"{what}, {kept} for each of the {num_replicas} devices: fewer than one batch of "
            f"{batch_size // num_replicas} per device; lower --batch-size")


class RunData:
    """Every batch of a run, training epochs and evaluations in the order the loop reads them, from one grain
    iterator: worker processes start once and prefetch across epoch ends and evaluations.

    ``segments`` are a :class:`~train.schedule.Schedule`'s (``schedule.segments(position)``), or
    ``[Segment("val")]`` for one evaluation. Batch order and content are those of :func:`make_loader` for each
    segment (same shuffles, augmentation and resume position). Evaluation resizes to ``resize_size`` and
    centre-crops ``val_image_size`` (default: ``image_size``, the training crop). Images are uint8; the jitted
    steps normalise them (``train.steps``).
    """

    NORMALIZE = False  # uint8 to the devices: 4x fewer bytes moved than float32

    @classmethod
    def padding_example(cls, image_size: int, augment: Augment | None = None) -> dict[str, np.ndarray]:
        """One (masked-out) example exactly as this class's batches hold it: the steps' input shapes and dtypes."""
        return ExampleLoader(None, 0, image_size, True, 0, 0, normalize=cls.NORMALIZE, augment=augment)(0)

    def __init__(self, splits: Splits, segments: Sequence[Segment], *, batch_size: int, image_size: int,
                 seed: int, num_workers: int = 0, process_index: int = 0, process_count: int = 1,
                 resize_size: int | None = None, val_image_size: int | None = None,
                 augment: Augment | None = None, ra_reps: int = 1, num_replicas: int = 1) -> None:
        common = {"batch_size": batch_size, "image_size": image_size, "seed": seed, "normalize": self.NORMALIZE,
                  "process_index": process_index, "process_count": process_count, "augment": augment}
        train_source = in_memory(splits.train) if any(s.kind == "train" for s in segments) else splits.train
        parts, self._pending = [], []
        val = None
        for seg in segments:
            if seg.kind == "train":
                part = build_epoch_dataset(train_source, train=True, epoch=seg.epoch, ra_reps=ra_reps,
                                           num_replicas=num_replicas, **common)[seg.start:seg.stop]
            else:
                if val is None:
                    held = int(train_source.offsets[-1]) if isinstance(train_source, BytesSource) else 0
                    val_source = in_memory(splits.val, IN_MEMORY_LIMIT - held)
                    val = build_epoch_dataset(val_source, train=False, resize_size=resize_size,
                                              **{**common, "image_size": val_image_size or image_size})
                part = val
            self._pending.append((seg, len(part)))
            parts.append(part)
        parts = [p for p in parts if len(p)]
        # Worker processes start now and read ahead while the caller builds and compiles the model; in-process
        # threads would only contend with that for the interpreter, so they start at the first batch.
        self._iterator = (grain_workers.iterate(grain.MapDataset.concatenate(parts), num_workers,
                                                start=num_workers > 0) if parts else iter(()))
        self._next = 0

    def train(self, epoch: int, start_batch: int) -> Iterator[dict[str, np.ndarray]]:
        """The batches of ``epoch`` from ``start_batch`` (to the schedule's stop)."""
        return self._segment(Segment("train", epoch, start_batch))

    def val(self) -> Iterator[dict[str, np.ndarray]]:
        """One evaluation pass over the validation split (padded last batch masked out)."""
        return self._segment(Segment("val"))

    def _segment(self, wanted: Segment) -> Iterator[dict[str, np.ndarray]]:
        seg, count = self._pending[self._next] if self._next < len(self._pending) else (None, 0)
        if seg is None or (seg.kind, seg.epoch, seg.start) != (wanted.kind, wanted.epoch, wanted.start):
            raise RuntimeError(f"the loop asked for {wanted}, but the run's schedule has {seg} next")
        self._next += 1
        return itertools.islice(self._iterator, count)

    def close(self) -> None:
        """Stop the worker processes (also when the run ends early)."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def _local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
    """This host's share of the global batch; the global batch must split evenly across hosts."""
    if batch_size < 1 or process_count < 1 or batch_size % process_count:
        raise DataError(
            f"global batch size {batch_size} does not split across {process_count} processes; "
            f"pass a --batch-size that is a positive multiple of {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
    return batch_size // process_count
