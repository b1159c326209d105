"""Datasets (image folders, TFDS, synthetic) and deterministic, resumable grain loaders.

Sources are random-access (``len`` + ``source[i] -> {"image": bytes | uint8 array | path, "label": int}``).
``make_loader`` builds one epoch as a lazy ``grain.MapDataset``: shuffle indices with a seed derived from
(seed, epoch), decode + augment each example with a generator seeded from (seed, epoch, example index),
batch into per-host sub-batches and slice out this host's share and the batches after ``start_batch``.
Nothing skipped is ever decoded, and the output does not depend on ``num_workers``.

Batches are ``{"image": float32 [b, S, S, 3], "label": int32 [b], "mask": float32 [b], "corrupt": int32 [b]}``:
``mask`` is 0 for eval padding and unreadable images, ``corrupt`` is 1 only for unreadable images (sum it to
count skips).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import shutil
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, Protocol

import grain
import numpy as np

from resnet_flax.errors import first_line, preview_keys
from train.errors import DataError
from train.transforms import eval_crop, normalize, open_image, train_crop

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
FOLDER_LAYOUT = "expected DIR/<class>/<images> or DIR/train/<class>/<images> + DIR/val/<class>/<images>"
_SHUFFLE_TAG = 0
_AUGMENT_TAG = 1
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


@dataclass(frozen=True)
class TfdsSource:
    """A ``tfds.data_source`` split re-keyed to ``{"image", "label"}`` (drops other features)."""

    source: Any
    image_key: str = "image"
    label_key: str = "label"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.source[index]
        return {"image": record[self.image_key], "label": int(record[self.label_key])}


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


# --------------------------------------------------------------------------------------------------- splits


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
        return _folder_splits(Path(data_dir), val_fraction, split_seed)
    if dataset == "synthetic":
        return _synthetic_splits(synthetic_size, synthetic_classes, val_fraction)
    return _tfds_splits(dataset, tfds_data_dir, val_fraction)


def count_classes(dataset: str = "tf_flowers", data_dir: str | os.PathLike | None = None,
                  tfds_data_dir: str | None = None) -> int:
    """The class count of what :func:`load_splits` opens, from metadata alone: no image read or downloaded."""
    if data_dir is not None or dataset == "synthetic":
        return load_splits(dataset, data_dir).num_classes  # lists files or makes nothing: cheap
    import tensorflow_datasets as tfds

    builder = _tfds_builder(tfds, dataset, tfds_data_dir)
    return builder.info.features[_tfds_keys(builder, dataset)[1]].num_classes


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


def _folder_splits(root: Path, val_fraction: float, split_seed: int) -> Splits:
    """ImageFolder-style splits: use train/ + val/ sub-folders when present, else a stratified split."""
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder; {FOLDER_LAYOUT}")
    split_dirs = _find_split_dirs(root)
    if split_dirs is not None:
        return _presplit_folder(root, *split_dirs)
    class_names = _class_dirs(root)
    if not class_names:
        raise DataError(f"data folder {root} has no class sub-folders; {FOLDER_LAYOUT}")
    per_class = _scan_classes(root, root, class_names)
    if not any(per_class):
        raise DataError(f"data folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)}); {FOLDER_LAYOUT}")
    _check_classes(root, class_names, per_class)
    train, val = _stratified_split(per_class, val_fraction, split_seed)
    return Splits(train=train, val=val, class_names=class_names)


def _find_split_dirs(root: Path) -> tuple[Path, Path] | None:
    """(train_dir, val_dir) when ``root`` holds train/ and val/ (or validation/) folders of class folders."""
    train_dir = root / "train"
    val_dirs = [root / name for name in ("val", "validation") if (root / name).is_dir()]
    if not train_dir.is_dir() or not val_dirs:
        return None
    if not _class_dirs(train_dir) or not _class_dirs(val_dirs[0]):
        return None
    return train_dir, val_dirs[0]


def _presplit_folder(root: Path, train_dir: Path, val_dir: Path) -> Splits:
    """Splits from explicit train/ and val/ folders; class names come from train/'s sub-folders."""
    class_names = _class_dirs(train_dir)
    unknown = sorted(set(_class_dirs(val_dir)) - set(class_names))
    if unknown:
        raise DataError(f"{val_dir} has classes missing from {train_dir}: {unknown[:5]}; use the same class folders")
    per_class = _scan_classes(root, train_dir, class_names)
    if not any(per_class):
        raise DataError(f"{train_dir} has no images ({', '.join(IMAGE_EXTENSIONS)}); {FOLDER_LAYOUT}")
    _check_classes(train_dir, class_names, per_class)
    val_per_class = _scan_classes(root, val_dir, class_names)
    no_val = [name for name, files in zip(class_names, val_per_class) if not files]
    if no_val:
        logger.warning("%s has no images of %d class(es) (%s); their validation accuracy is not measured",
                       val_dir, len(no_val), preview_keys(no_val))
    return Splits(train=_file_source(per_class), val=_file_source(val_per_class), class_names=class_names)


def _check_classes(folder: Path, class_names: list[str], per_class: Sequence[Sequence[str]]) -> None:
    """Refuse what would train on something other than the folder shows: a folder of class folders given one
    level too high, class folders without images (a dead class in the head), or a single class."""
    if len(class_names) == 1:
        nested = folder / class_names[0]
        inner = [d for d in _class_dirs(nested) if _image_files(nested / d, folder)]
        if len(inner) > 1:
            raise DataError(f"{folder} holds only the folder {nested}, which holds class folders "
                            f"({preview_keys(inner)}); pass --data-dir {nested}")
        raise DataError(f"{folder} has a single class folder ({class_names[0]}): a classifier needs at least "
                        "two classes; add one sub-folder of images per class")
    empty = [name for name, files in zip(class_names, per_class) if not files]
    if empty:
        raise DataError(f"class folder(s) {preview_keys(empty)} in {folder} have no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the empty folders")


def _class_dirs(folder: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_classes(root: Path, folder: Path, class_names: Sequence[str]) -> list[list[str]]:
    """Image paths of each class folder of ``folder``; an image reached from two classes is refused."""
    scanned = [_walk_images(folder / name, root) if (folder / name).is_dir() else [] for name in class_names]
    owner: dict[str, str] = {}
    for name, files in zip(class_names, scanned):
        for _, real in files:
            if owner.setdefault(real, name) != name:
                raise DataError(f"{real} is an image of both class {owner[real]} and class {name} (through a "
                                f"symbolic link under {folder}); remove the link so each image has one label")
    return [sorted(path for path, _ in files) for files in scanned]


def _image_files(folder: Path, root: Path | None = None) -> list[str]:
    """Sorted image paths (by extension, case-insensitive) anywhere under ``folder``, hidden entries skipped."""
    return sorted(path for path, _ in _walk_images(folder, root))


def _walk_images(folder: Path, root: Path | None = None) -> list[tuple[str, str]]:
    """(path, real path) of each image under ``folder``, following symbolic links but reading each image and
    folder once: a link back to ``folder`` or a parent (a loop) or to something already read is skipped with
    a warning; a link into another class folder of the data folder ``root`` is refused (its images would get
    this class's label)."""
    folder_real = os.path.realpath(folder)
    root_real = os.path.realpath(root if root is not None else folder)
    seen, skipped, found = {folder_real}, [], []

    def follow(path: str, real: str) -> bool:
        if real in seen or folder_real.startswith(real + os.sep):
            skipped.append(f"{path} -> {real}")
            return False
        if real.startswith(root_real + os.sep) and not real.startswith(folder_real + os.sep):
            raise DataError(f"{path} links to {real}, outside its class folder {folder} but inside the data "
                            f"folder {root_real}: its images would be labelled {Path(folder).name}; "
                            "remove the link or move the images")
        seen.add(real)
        return True

    stack = [(os.fspath(folder), folder_real)]
    while stack:
        dirpath, dir_real = stack.pop()
        try:
            with os.scandir(dirpath) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"cannot read the folder {dirpath} ({e.strerror}); fix its permissions") from None
        for e in entries:
            if e.name.startswith("."):
                continue
            is_dir = e.is_dir()  # follows links
            if not is_dir and not e.name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            if e.is_symlink():
                if not follow(e.path, os.path.realpath(e.path)):
                    continue
                real = os.path.realpath(e.path)
            else:
                real = os.path.join(dir_real, e.name)
                if real in seen:
                    skipped.append(f"{e.path} (read already through a link)")
                    continue
                seen.add(real)
            if is_dir:
                stack.append((e.path, real))
            else:
                found.append((e.path, real))
    if skipped:
        logger.warning("%s: skipped %d symbolic link(s) to images or folders already read (a loop or a repeat), "
                       "so each image is read once: %s", folder, len(skipped), preview_keys(skipped, 2))
    return found


def _file_source(per_class: Sequence[Sequence[str]]) -> FileSource:
    """Flatten per-class path lists into a FileSource labelled by list position."""
    paths = tuple(p for files in per_class for p in files)
    labels = tuple(label for label, files in enumerate(per_class) for _ in files)
    return FileSource(paths, labels)


def _stratified_split(
    per_class: Sequence[Sequence[str]], val_fraction: float, seed: int
) -> tuple[FileSource, FileSource]:
    """Seeded per-class split: round(n * val_fraction) images of each class go to val (train keeps >= 1)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for files in per_class:
        order = rng.permutation(len(files))
        n_val = min(round(len(files) * val_fraction), max(len(files) - 1, 0))
        val.append(sorted(files[i] for i in order[:n_val]))
        train.append(sorted(files[i] for i in order[n_val:]))
    return _file_source(train), _file_source(val)


def _tfds_splits(name: str, tfds_data_dir: str | None, val_fraction: float) -> Splits:
    """Open a TFDS dataset as grain-compatible random-access sources (array_record, no TensorFlow)."""
    import tensorflow_datasets as tfds  # heavy import; only needed for this path (and not in grain workers)

    builder = _tfds_builder(tfds, name, tfds_data_dir)
    image_key, label_key = _tfds_keys(builder, name)
    if not builder.is_prepared():
        _tfds_prepare(builder, name)
    train_split, val_split = _tfds_split_names(builder.info.splits, val_fraction, name)
    try:
        train = tfds.data_source(name, split=train_split, data_dir=tfds_data_dir, download=False)
        val = tfds.data_source(name, split=val_split, data_dir=tfds_data_dir, download=False)
    except Exception as e:
        raise DataError(
            f"could not open TFDS dataset {name!r} for random access ({first_line(e)}); "
            f"rebuild it in array_record format with `tfds build {name} --file_format=array_record`"
        ) from None
    return Splits(
        train=TfdsSource(train, image_key, label_key),
        val=TfdsSource(val, image_key, label_key),
        class_names=list(builder.info.features[label_key].names),
    )


def _tfds_builder(tfds: Any, name: str, tfds_data_dir: str | None) -> Any:
    """``tfds.builder`` for the array_record variant; an unknown name becomes a DataError."""
    try:
        return tfds.builder(name, data_dir=tfds_data_dir, file_format="array_record")
    except Exception as e:
        raise DataError(
            f"unknown dataset {name!r} ({first_line(e)}); pass a TFDS name such as tf_flowers, imagenette or "
            "imagenet2012, 'synthetic', or --data-dir path/to/image_folder"
        ) from None


def _tfds_keys(builder: Any, name: str) -> tuple[str, str]:
    """(image key, label key): "image"/"label" when they exist, else the first Image / ClassLabel feature."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    if not images or not labels:
        raise DataError(
            f"TFDS dataset {name!r} has no Image + ClassLabel features ({list(features.keys())}); "
            "use an image-classification dataset or --data-dir"
        )
    image_key = "image" if "image" in images else images[0]
    label_key = "label" if "label" in labels else labels[0]
    return image_key, label_key


def _tfds_prepare(builder: Any, name: str) -> None:
    """Download and prepare a missing dataset; failure (offline, manual download) becomes a DataError."""
    root = Path(builder.data_dir_root)
    build = f"`tfds build {name} --file_format=array_record --data_dir {root}`"
    manual_dir = root / "downloads" / "manual"
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not (manual_dir.is_dir() and any(manual_dir.iterdir())):
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in {root} and needs a manual download; put its archives in "
            f"TFDS's manual_dir {manual_dir} and run {build}, or pass --data-dir path/to/image_folder"
        )
    try:
        with _removed_on_failure(root, name), _few_download_retries():
            builder.download_and_prepare()
    except ModuleNotFoundError as e:
        if "tensorflow" not in str(e):
            raise
        raise DataError(
            f"preparing TFDS dataset {name!r} the first time runs TFDS's builder, which needs TensorFlow; "
            "install it with `pip install 'resnet-flax[tfds]'` (or tensorflow-cpu) and rerun, "
            "or pass --data-dir path/to/image_folder"
        ) from None
    except Exception as e:
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in {root} and could not be built here ({first_line(e)}); "
            "preparing it the first time needs network access and the [tfds] extra "
            f"(`pip install 'resnet-flax[tfds]'`): run {build} on a machine with both (copy {root / name} here), "
            "or pass --data-dir path/to/image_folder"
        ) from None


@contextlib.contextmanager
def _few_download_retries(retries: int = 2) -> Iterator[None]:
    """TFDS retries a failed download 10 times with exponential back-off (3.5 minutes offline); allow a few."""
    from tensorflow_datasets.core.download import downloader

    saved, downloader.MAX_RETRIES = downloader.MAX_RETRIES, retries
    try:
        yield
    finally:
        downloader.MAX_RETRIES = saved


@contextlib.contextmanager
def _removed_on_failure(root: Path, name: str) -> Iterator[None]:
    """Remove what a failed first preparation left in TFDS's folders (partial downloads, empty folders)."""
    downloads = root / "downloads"
    own = [root / name, downloads / name]  # this dataset's: removed whole if new
    shared = [downloads / "extracted", downloads, root]  # removed only if new and empty
    existed = {p for p in own + shared if p.exists()}
    partial = set(downloads.glob(f"{name}/*.tmp.*"))
    try:
        yield
    except BaseException:
        for p in [p for p in own if p not in existed] + sorted(set(downloads.glob(f"{name}/*.tmp.*")) - partial):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        for p in shared:
            if p not in existed and p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise


def _tfds_split_names(splits: Any, val_fraction: float, name: str) -> tuple[str, str]:
    """Train split and eval split: "validation", else "test", else a percent slice of "train"."""
    names = set(splits.keys()) if splits else set()
    if names and "train" not in names:
        raise DataError(f"TFDS dataset {name!r} has no 'train' split ({sorted(names)}); use --data-dir instead")
    for val_name in ("validation", "test"):
        if val_name in names:
            return "train", val_name
    cut = round((1.0 - val_fraction) * 100)
    return f"train[:{cut}%]", f"train[{cut}%:]"


# --------------------------------------------------------------------------------------------------- loaders


def steps_per_epoch(num_examples: int, global_batch_size: int, train: bool = True) -> int:
    """Batches per epoch: train drops the last partial batch, eval pads it (ceil)."""
    if train:
        return num_examples // global_batch_size
    return math.ceil(num_examples / global_batch_size)


@dataclass(frozen=True)
class ExampleLoader:
    """Per-example decode + augment, a picklable grain map: index -> example dict (padding/corrupt masked).

    Images are uint8 unless ``normalize`` (then float32 ``ToTensor`` + ``Normalize`` on the host).
    """

    source: Source
    num_examples: int
    image_size: int
    train: bool
    seed: int
    epoch: int
    resize_size: int | None = None
    normalize: bool = True

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        if index >= self.num_examples:
            return self._blank(corrupt=0)
        record: dict[str, Any] = {}
        try:
            record = self.source[index]
            image = open_image(record["image"])
            if self.train:
                pixels = train_crop(image, self.image_size, example_rng(self.seed, self.epoch, index))
            else:
                pixels = eval_crop(image, self.image_size, self.resize_size)
            label = int(record["label"])
        except Exception as e:
            logger.warning("skipping unreadable image %s: %s", _describe(record, index), first_line(e))
            return self._blank(corrupt=1)
        return {"image": normalize(pixels) if self.normalize else pixels, "label": np.int32(label),
                "mask": np.float32(1.0), "corrupt": np.int32(0)}

    def _blank(self, corrupt: int) -> dict[str, np.ndarray]:
        """An all-zero, masked-out example (eval padding when ``corrupt=0``, unreadable image when 1)."""
        return {
            "image": np.zeros((self.image_size, self.image_size, 3), np.float32 if self.normalize else np.uint8),
            "label": np.int32(0),
            "mask": np.float32(0.0),
            "corrupt": np.int32(corrupt),
        }


def _describe(record: dict[str, Any], index: int) -> str:
    """The file path when the example has one, else its index."""
    if isinstance(record, dict) and "path" in record:
        return str(record["path"])
    image = record.get("image") if isinstance(record, dict) else None
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return f"#{index}"


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Augmentation generator for one example in one epoch, independent of batching, resume and workers."""
    return np.random.default_rng([seed % 2**64, epoch, _AUGMENT_TAG, index])


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
    )
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    ds = ds[start_batch:]
    if len(ds) == 0:
        return iter(())
    return _iterate(_to_iter(ds, num_workers))


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
) -> grain.MapDataset:
    """Lazy MapDataset of this host's sub-batches for one epoch; ``ds[k]`` is its share of global batch k."""
    local_batch = _local_batch_size(batch_size, process_index, process_count)
    num_examples = len(source)
    num_batches = steps_per_epoch(num_examples, batch_size, train)
    if train and num_batches == 0:
        raise DataError(
            f"train split has {num_examples} examples, fewer than one global batch of {batch_size}; "
            "lower --batch-size or add data"
        )
    if train:
        indices = grain.MapDataset.range(num_examples).shuffle(seed=epoch_shuffle_seed(seed, epoch))
        indices = indices[: num_batches * batch_size]
    else:
        indices = grain.MapDataset.range(num_batches * batch_size)  # indices >= num_examples are padding
    examples = indices.map(ExampleLoader(source, num_examples, image_size, train, seed, epoch, resize_size,
                                         normalize))
    return examples.batch(local_batch, drop_remainder=False)[process_index::process_count]


@dataclass(frozen=True)
class Segment:
    """A stretch of a run's batches: training batches [start, stop) of ``epoch``, or one whole evaluation."""

    kind: str  # "train" | "val"
    epoch: int = 0
    start: int = 0
    stop: int = 0


def run_schedule(steps_per_epoch_: int, total_steps: int, step: int, epoch: int, start_batch: int,
                 eval_every_epochs: int = 1) -> list[Segment]:
    """The segments a training loop at (step, epoch, start_batch) reads, in order, until ``total_steps``.

    Training stops at ``total_steps``; an evaluation follows every ``eval_every_epochs``-th finished epoch
    and the last segment.
    """
    segments = []
    num_epochs = math.ceil(total_steps / steps_per_epoch_)
    while epoch < num_epochs and step < total_steps:
        stop = min(steps_per_epoch_, start_batch + total_steps - step)
        segments.append(Segment("train", epoch, start_batch, stop))
        step += stop - start_batch
        epoch, start_batch = (epoch + 1, 0) if stop >= steps_per_epoch_ else (epoch, stop)
        if (start_batch == 0 and epoch % eval_every_epochs == 0) or step >= total_steps:
            segments.append(Segment("val"))
    return segments


class RunData:
    """Every batch of a run, training epochs and evaluations in the order the loop reads them, from one grain
    iterator: worker processes start once and prefetch across epoch ends and evaluations.

    Batch order and content are those of :func:`make_loader` for each segment (same shuffles, augmentation
    and resume position). Images are uint8; the jitted steps normalise them (``train.steps``).
    """

    NORMALIZE = False  # uint8 to the devices: 4x fewer bytes moved than float32

    @classmethod
    def padding_example(cls, image_size: int) -> dict[str, np.ndarray]:
        """One (masked-out) example exactly as this class's batches hold it: the steps' input shapes and dtypes."""
        return ExampleLoader(None, 0, image_size, True, 0, 0, normalize=cls.NORMALIZE)(0)

    def __init__(self, splits: Splits, schedule: Sequence[Segment], *, batch_size: int, image_size: int,
                 seed: int, num_workers: int = 0, process_index: int = 0, process_count: int = 1,
                 resize_size: int | None = None) -> None:
        common = {"batch_size": batch_size, "image_size": image_size, "seed": seed, "normalize": self.NORMALIZE,
                  "process_index": process_index, "process_count": process_count}
        train_source = in_memory(splits.train) if any(s.kind == "train" for s in schedule) else splits.train
        parts, self._pending = [], []
        val = None
        for seg in schedule:
            if seg.kind == "train":
                part = build_epoch_dataset(train_source, train=True, epoch=seg.epoch, **common)[seg.start:seg.stop]
            else:
                if val is None:
                    held = int(train_source.offsets[-1]) if isinstance(train_source, BytesSource) else 0
                    val_source = in_memory(splits.val, IN_MEMORY_LIMIT - held)
                    val = build_epoch_dataset(val_source, train=False, resize_size=resize_size, **common)
                part = val
            self._pending.append((seg, len(part)))
            parts.append(part)
        parts = [p for p in parts if len(p)]
        self._iterator = _iterate(_to_iter(grain.MapDataset.concatenate(parts), num_workers)) if parts else iter(())
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


def _to_iter(ds: grain.MapDataset, num_workers: int) -> grain.IterDataset:
    """In-process thread prefetch for ``num_workers == 0``, else grain worker processes (same order)."""
    if num_workers <= 0:
        threads = max(1, min(8, os.cpu_count() or 1))
        return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
    _mark_absl_flags_parsed()
    per_worker = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    return per_worker.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                                  worker_init_fn=_init_worker)


def _init_worker(worker_index: int, worker_count: int) -> None:
    """Workers leave Ctrl-C to the main process (which stops them and frees their buffers in order) and print
    their warnings as the main process does: the message alone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False


def _unlink_shared_memory(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Free the names of the shared-memory blocks a worker's batch arrives in, now rather than at grain's leisure.

    grain unlinks them from a background thread when the arrays are collected, which may not run before the
    process exits (a "leaked shared_memory" warning each run). The arrays stay valid: unlinking removes the
    name, and the memory goes when the arrays do.
    """
    for array in batch.values():
        shm = getattr(array, "shm", None)
        if isinstance(shm, shared_memory.SharedMemory) and getattr(array, "_unlink_on_del", False):
            shm.unlink()
            array._unlink_on_del = False  # grain's flag: its collector now only unmaps
    return batch


def _mark_absl_flags_parsed() -> None:
    """grain's multiprocessing reads absl flags; outside ``absl.app`` they must be marked parsed first."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _iterate(ds: grain.IterDataset) -> Iterator[dict[str, np.ndarray]]:
    """Yield batches and close the grain iterator (and its worker processes) when done or abandoned."""
    iterator = iter(ds)
    try:
        for batch in iterator:
            yield _unlink_shared_memory(batch)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            try:
                close()
            except Exception as e:
                logger.debug("closing the grain iterator failed: %s", first_line(e))
