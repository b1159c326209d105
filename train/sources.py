"""Datasets as random-access sources: image folders, TFDS and synthetic images, split into train and validation.

A source has ``len(src)`` and ``src[i] -> {"image": bytes | uint8 array | path, "label": int}``.
:func:`load_splits` opens a dataset's train and validation sources (``train.folders`` scans image folders,
``train.tfds_data`` opens TFDS datasets); :func:`count_classes` counts its classes without reading an image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from train import folders, tfds_data
from train.errors import DataError
from train.storage import as_path, is_url, read_many, sizes

_SYNTHETIC_TRAIN_SEED = 0
_SYNTHETIC_VAL_SEED = 1


class Source(Protocol):
    """Random-access examples: ``len(src)`` and ``src[i] -> {"image": ..., "label": int}``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class FileSource:
    """Image files on disk with integer labels; examples carry the path so errors can name the file."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.paths[index], "label": self.labels[index]}


@dataclass(frozen=True)
class BytesSource:
    """A :class:`FileSource` read into memory: every file's bytes in one buffer (grain pickles it to each worker
    as one array), with the paths kept for error messages."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    buffer: np.ndarray  # uint8, all files back to back
    offsets: np.ndarray  # int64 [len + 1]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        data = self.buffer[self.offsets[index]:self.offsets[index + 1]].tobytes()
        return {"image": data, "label": self.labels[index], "path": self.paths[index]}


# Each grain worker holds its own copy of an in-memory dataset (spawned workers receive it pickled), so at the
# default 2 workers 256 MiB of files (train + val) cost ~0.75 GiB in all: tf_flowers (230 MB) fits, ImageNet
# does not. Files in the page cache read fast anyway; this saves re-reading cold or network storage every epoch.
IN_MEMORY_LIMIT = 256 * 2**20


def in_memory(source: Source, limit: int = IN_MEMORY_LIMIT) -> Source:
    """``source`` as a :class:`BytesSource` when it is a :class:`FileSource` whose files add up to at most
    ``limit`` bytes (and all can be read now); otherwise ``source`` itself (read from disk per example)."""
    if not isinstance(source, FileSource) or not len(source):
        return source
    if is_url(source.paths[0]):
        return _objects_in_memory(source, limit)
    sizes = []
    try:
        for path in source.paths:
            sizes.append(os.stat(path).st_size)
            if sum(sizes) > limit:  # stops after ~limit / file size stats on a big dataset
                return source
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        buffer = np.empty(int(offsets[-1]), np.uint8)
        for path, start, end in zip(source.paths, offsets[:-1], offsets[1:]):
            with open(path, "rb") as f:
                if f.readinto(memoryview(buffer)[start:end]) != end - start:
                    return source  # changed while reading: leave it to the per-example path
    except OSError:
        return source  # the per-example path names the unreadable file
    return BytesSource(source.paths, source.labels, buffer, offsets)


def _objects_in_memory(source: FileSource, limit: int, chunk: int = 256) -> Source:
    """:func:`in_memory` for objects at URLs: their sizes and bytes fetched concurrently, ``chunk`` at a time."""
    found: list[int] = []
    try:
        for i in range(0, len(source.paths), chunk):
            found += sizes(source.paths[i:i + chunk])
            if sum(found) > limit:
                return source
        data = [b for i in range(0, len(source.paths), chunk) for b in read_many(source.paths[i:i + chunk])]
    except OSError:
        return source  # the per-example path names the unreadable object
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in data])]).astype(np.int64)
    return BytesSource(source.paths, source.labels, np.frombuffer(b"".join(data), np.uint8), offsets)


@dataclass(frozen=True)
class SyntheticSource:
    """Deterministic random uint8 images whose mean colour depends on the label (learnable, no files)."""

    num_examples: int
    num_classes: int
    image_size: int = 128
    seed: int = 0

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, index])
        hue = 2 * np.pi * label / self.num_classes
        colour = 128 + 80 * np.cos(hue + np.array([0.0, 2.0944, 4.1888]))
        noise = rng.integers(-48, 48, size=(self.image_size, self.image_size, 3))
        image = np.clip(colour + noise, 0, 255).astype(np.uint8)
        return {"image": image, "label": label}


@dataclass
class Splits:
    """Train and validation sources plus the class names their labels index."""

    train: Source
    val: Source
    class_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``class_names``)."""
        return len(self.class_names)


def load_splits(
    dataset: str = "tf_flowers",
    data_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | None = None,
    val_fraction: float = 0.2,
    synthetic_size: int = 1024,
    synthetic_classes: int = 10,
    split_seed: int = 0,
) -> Splits:
    """Open train/val splits from an image folder (``data_dir``), ``"synthetic"``, or a TFDS dataset name.

    ``synthetic_size`` is the synthetic train-split size (val gets ``val_fraction`` of it, at least 1);
    ``split_seed`` seeds the stratified split of folders that lack train/val sub-folders.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} is out of range; pass a value in [0, 1)")
    if data_dir is not None:
        found = folders.scan_folder(as_path(data_dir), val_fraction, split_seed)
        return Splits(_file_source(found.train), _file_source(found.val), found.class_names)
    if dataset == "synthetic":
        return _synthetic_splits(synthetic_size, synthetic_classes, val_fraction)
    train, val, class_names = tfds_data.open_splits(dataset, tfds_data_dir, val_fraction)
    return Splits(train, val, class_names)


def count_classes(dataset: str = "tf_flowers", data_dir: str | os.PathLike | None = None,
                  tfds_data_dir: str | None = None) -> int:
    """The class count of what :func:`load_splits` opens, from metadata alone: no image read or downloaded."""
    if data_dir is not None or dataset == "synthetic":
        return load_splits(dataset, data_dir).num_classes  # lists files or makes nothing: cheap
    return tfds_data.num_classes(dataset, tfds_data_dir)


def _synthetic_splits(size: int, num_classes: int, val_fraction: float) -> Splits:
    """Synthetic train/val splits with different seeds so val images are not train images."""
    if size < 1 or num_classes < 1:
        raise DataError(f"synthetic dataset needs size >= 1 and classes >= 1 (got {size}, {num_classes})")
    val_size = max(1, round(size * val_fraction))
    return Splits(
        train=SyntheticSource(size, num_classes, seed=_SYNTHETIC_TRAIN_SEED),
        val=SyntheticSource(val_size, num_classes, seed=_SYNTHETIC_VAL_SEED),
        class_names=[f"class_{k}" for k in range(num_classes)],
    )


def _file_source(per_class: Sequence[Sequence[str]]) -> FileSource:
    """Flatten per-class path lists into a FileSource labelled by list position."""
    paths = tuple(p for files in per_class for p in files)
    labels = tuple(label for label, files in enumerate(per_class) for _ in files)
    return FileSource(paths, labels)
