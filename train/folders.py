"""Image folders as per-class lists of image paths: layout detection, scanning, symbolic links, class checks and
the stratified train/validation split of folders without one.

A data folder holds ``<class>/<images>`` or ``train/<class>/<images>`` + ``val/<class>/<images>``; images may sit
in nested folders and be reached through symbolic links, but each image is read once and gets one label.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resnet_flax.errors import preview_keys
from train.errors import DataError
from train.storage import AnyPath, find_files, is_url

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
FOLDER_LAYOUT = "expected DIR/<class>/<images> or DIR/train/<class>/<images> + DIR/val/<class>/<images>"


@dataclass(frozen=True)
class FolderSplits:
    """The image paths of each class (in label order) of a data folder's train and validation parts."""

    class_names: list[str]
    train: list[list[str]]
    val: list[list[str]]


def scan_folder(root: AnyPath, val_fraction: float, split_seed: int) -> FolderSplits:
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
    return FolderSplits(class_names, train, val)


def _find_split_dirs(root: AnyPath) -> tuple[AnyPath, AnyPath] | None:
    """(train_dir, val_dir) when ``root`` holds train/ and val/ (or validation/) folders of class folders."""
    train_dir = root / "train"
    val_dirs = [root / name for name in ("val", "validation") if (root / name).is_dir()]
    if not train_dir.is_dir() or not val_dirs:
        return None
    if not _class_dirs(train_dir) or not _class_dirs(val_dirs[0]):
        return None
    return train_dir, val_dirs[0]


def _presplit_folder(root: AnyPath, train_dir: AnyPath, val_dir: AnyPath) -> FolderSplits:
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
    return FolderSplits(class_names, per_class, val_per_class)


def _check_classes(folder: AnyPath, class_names: list[str], per_class: Sequence[Sequence[str]]) -> None:
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


def _class_dirs(folder: AnyPath) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_classes(root: AnyPath, folder: AnyPath, class_names: Sequence[str]) -> list[list[str]]:
    """Image paths of each class folder of ``folder``; an image reached from two classes is refused."""
    scanned = [_walk_images(folder / name, root) if (folder / name).is_dir() else [] for name in class_names]
    owner: dict[str, str] = {}
    for name, files in zip(class_names, scanned):
        for _, real in files:
            if owner.setdefault(real, name) != name:
                raise DataError(f"{real} is an image of both class {owner[real]} and class {name} (through a "
                                f"symbolic link under {folder}); remove the link so each image has one label")
    return [sorted(path for path, _ in files) for files in scanned]


def _image_files(folder: AnyPath, root: AnyPath | None = None) -> list[str]:
    """Sorted image paths (by extension, case-insensitive) anywhere under ``folder``, hidden entries skipped."""
    return sorted(path for path, _ in _walk_images(folder, root))


def _walk_images(folder: AnyPath, root: AnyPath | None = None) -> list[tuple[str, str]]:
    """(path, real path) of each image under ``folder``, following symbolic links but reading each image and
    folder once: a link back to ``folder`` or a parent (a loop) or to something already read is skipped with
    a warning; a link into another class folder of the data folder ``root`` is refused (its images would get
    this class's label). Under a URL (an object store: no links) every image object is listed at once."""
    if is_url(folder):
        return [(f, f) for f in _image_objects(folder)]
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


def _image_objects(folder: AnyPath) -> list[str]:
    """The URLs of the image objects under the URL ``folder``, hidden names (at any depth) skipped."""
    prefix = str(folder).rstrip("/") + "/"
    return [f for f in find_files(folder) if f.startswith(prefix) and f.lower().endswith(IMAGE_EXTENSIONS)
            and not any(part.startswith(".") for part in f[len(prefix):].split("/"))]


def _stratified_split(
    per_class: Sequence[Sequence[str]], val_fraction: float, seed: int
) -> tuple[list[list[str]], list[list[str]]]:
    """Seeded per-class split: round(n * val_fraction) images of each class go to val (train keeps >= 1)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for files in per_class:
        order = rng.permutation(len(files))
        n_val = min(round(len(files) * val_fraction), max(len(files) - 1, 0))
        val.append(sorted(files[i] for i in order[:n_val]))
        train.append(sorted(files[i] for i in order[n_val:]))
    return train, val
