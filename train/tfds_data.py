"""TFDS datasets as random-access sources: download and prepare on first use (cleaning up after a failure),
then open the array_record files through ``tfds.data_source`` (no TensorFlow needed once prepared).

``tensorflow_datasets`` is imported only inside the functions that use it: it is heavy, and importing the
training package (as ``--data-dir`` runs and grain's worker processes do) must not pull it in.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resnet_flax.errors import first_line
from train.errors import DataError
from train.storage import is_url


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


def open_splits(name: str, tfds_data_dir: str | None, val_fraction: float
                ) -> tuple[TfdsSource, TfdsSource, list[str]]:
    """(train, val, class names) of a TFDS dataset as grain-compatible random-access sources (array_record, no
    TensorFlow), downloading and preparing it first if it is not yet."""
    import tensorflow_datasets as tfds  # heavy import; only needed for this path (and not in grain workers)

    builder = _builder(tfds, name, tfds_data_dir)
    image_key, label_key = _keys(builder, name)
    if not builder.is_prepared():
        _prepare(builder, name)
    train_split, val_split = split_names(builder.info.splits, val_fraction, name)
    try:
        train = tfds.data_source(name, split=train_split, data_dir=tfds_data_dir, download=False)
        val = tfds.data_source(name, split=val_split, data_dir=tfds_data_dir, download=False)
    except Exception as e:
        raise DataError(
            f"could not open TFDS dataset {name!r} for random access ({first_line(e)}); "
            f"rebuild it in array_record format with `tfds build {name} --file_format=array_record`"
        ) from None
    return (TfdsSource(train, image_key, label_key), TfdsSource(val, image_key, label_key),
            list(builder.info.features[label_key].names))


def num_classes(name: str, tfds_data_dir: str | None) -> int:
    """The class count of a TFDS dataset from its metadata: nothing downloaded or prepared."""
    import tensorflow_datasets as tfds

    builder = _builder(tfds, name, tfds_data_dir)
    return builder.info.features[_keys(builder, name)[1]].num_classes


def split_names(splits: Any, val_fraction: float, name: str) -> tuple[str, str]:
    """Train split and eval split: "validation", else "test", else a percent slice of "train"."""
    names = set(splits.keys()) if splits else set()
    if names and "train" not in names:
        raise DataError(f"TFDS dataset {name!r} has no 'train' split ({sorted(names)}); use --data-dir instead")
    for val_name in ("validation", "test"):
        if val_name in names:
            return "train", val_name
    cut = round((1.0 - val_fraction) * 100)
    return f"train[:{cut}%]", f"train[{cut}%:]"


def _builder(tfds: Any, name: str, tfds_data_dir: str | None) -> Any:
    """``tfds.builder`` for the array_record variant; an unknown name becomes a DataError."""
    try:
        return tfds.builder(name, data_dir=tfds_data_dir, file_format="array_record")
    except Exception as e:
        raise DataError(
            f"unknown dataset {name!r} ({first_line(e)}); pass a TFDS name such as tf_flowers, imagenette or "
            "imagenet2012, 'synthetic', or --data-dir path/to/image_folder"
        ) from None


def _keys(builder: Any, name: str) -> tuple[str, str]:
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


def _prepare(builder: Any, name: str) -> None:
    """Download and prepare a missing dataset; failure (offline, manual download) becomes a DataError."""
    if is_url(str(builder.data_dir_root)):
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir_root}; prepare it on a machine with "
            f"`tfds build {name} --file_format=array_record --data_dir DIR` and copy DIR/{name} there (a run reads "
            "a prepared dataset from a bucket, but does not prepare one into it)")
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

    # TFDS reads this module constant for every download session; neither DownloadConfig nor download_and_prepare
    # takes a retry count, so it is set for the preparation and restored after.
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

