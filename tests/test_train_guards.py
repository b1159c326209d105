"""Training refuses or survives what would lose a run or train on something other than the user sees: NaN
stops, image folders with links/nesting/empty classes, two runs on one workdir, changed flags on resume, bad
values, full disks, hostile images and checkpoints given to predict."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train import data
from train.__main__ import main as train_main
from train.data import DataError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("red", "green", "blue")
SMALL = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--num-workers", "0", "--no-progress",
         "--optimizer", "adamw", "--lr", "1e-3", "--lr-scaling", "none", "--warmup-steps", "0", "--weight-decay", "0",
         "--label-smoothing", "0"]


def train_cli(capsys, *args) -> tuple[int, str, list[str]]:
    """``python -m train ARGS`` in this process: (exit code, stdout, stderr lines that are not warnings)."""
    code = train_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.strip().splitlines() if line.startswith("error")]


def write_folder(root: Path, per_class: int = 4, classes=CLASSES, size=(20, 16)) -> Path:
    """Small colour-coded JPEGs, ``per_class`` per class folder."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 90, (size[1], size[0], 3), dtype=np.uint8)
            img[..., c % 3] += 150
            Image.fromarray(img).save(root / name / f"{i}.jpg")
    return root


def labelled(splits: data.Splits) -> list[tuple[str, str]]:
    """(class folder the file really sits in, class name it is labelled with) for every example."""
    out = []
    for src in (splits.train, splits.val):
        for i in range(len(src)):
            rec = src[i]
            out.append((Path(os.path.realpath(rec["image"])).parent.name, splits.class_names[rec["label"]]))
    return out


def one_line_data_error(root: Path, match: str) -> str:
    with pytest.raises(DataError) as info:
        data.load_splits(data_dir=root)
    msg = str(info.value)
    assert "\n" not in msg and match in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ image folders


def test_symlink_loops_and_repeats_read_each_image_once_with_its_own_label(tmp_path, caplog):
    root = write_folder(tmp_path / "data")
    (root / "red" / "loop").symlink_to(root)  # the loop that turned 24 images into 788
    (root / "green" / "self").symlink_to(root / "green")
    (root / "blue" / "again.jpg").symlink_to(root / "blue" / "0.jpg")
    with caplog.at_level(logging.WARNING, logger="train.data"):
        splits = data.load_splits(data_dir=root)
    pairs = labelled(splits)
    assert len(pairs) == 12 and all(real == label for real, label in pairs), pairs
    warned = [r.getMessage() for r in caplog.records if "symbolic link" in r.getMessage()]
    assert len(warned) == 3 and all("\n" not in w for w in warned)


def test_links_that_would_mislabel_are_refused(tmp_path):
    root = write_folder(tmp_path / "data")
    (root / "red" / "more").symlink_to(root / "green")
    one_line_data_error(root, "would be labelled red")
    (root / "red" / "more").unlink()
    (root / "red" / "g.jpg").symlink_to(root / "green" / "1.jpg")
    one_line_data_error(root, "would be labelled red")
    (root / "red" / "g.jpg").unlink()
    (root / "teal").symlink_to(root / "green")  # a class folder that is another class under a second name
    one_line_data_error(root, "both class green and class teal")


def test_folder_of_class_folders_one_level_down_names_it(tmp_path):
    root = tmp_path / "download"
    write_folder(root / "flower_photos")
    msg = one_line_data_error(root, "pass --data-dir")
    assert msg.endswith(f"pass --data-dir {root / 'flower_photos'}")


def test_single_class_and_empty_class_folders_refused(tmp_path):
    one_line_data_error(write_folder(tmp_path / "one", classes=("cats",)), "at least two classes")
    root = write_folder(tmp_path / "three")
    (root / "empty").mkdir()
    (root / "empty" / ".DS_Store").write_text("x")
    one_line_data_error(root, "empty")
    pre = tmp_path / "pre"
    write_folder(pre / "train")
    write_folder(pre / "val", classes=("red", "green"))  # no blue in val: still trains, with a warning
    assert data.load_splits(data_dir=pre).class_names == sorted(CLASSES)


# ------------------------------------------------------------------------------------------------ predict


def bomb_png(path: Path, side: int = 40_000) -> Path:
    """A ~100-byte PNG declaring side x side pixels (4.8 GB decoded): a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def predict_cli(capsys, *args) -> tuple[int, str, list[str]]:
    from train.predict import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_predict_refuses_bombs_broken_images_and_nonfinite_outputs(tmp_path, capsys):
    import resnet_flax

    model = resnet_flax.create_model("resnet18", num_classes=3)
    resnet_flax.save(model, tmp_path / "ok.flax.safetensors")
    photo = write_folder(tmp_path / "imgs", per_class=1) / "red" / "0.jpg"
    code, out, _ = predict_cli(capsys, photo, "--checkpoint", tmp_path / "ok.flax.safetensors", "--image-size", 32)
    assert code == 0 and "%" in out
    for bad, why in [(bomb_png(tmp_path / "bomb.png"), "too large"),
                     (tmp_path / "broken.jpg", "cannot read the image")]:
        if not bad.exists():
            bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
        code, out, err = predict_cli(capsys, bad, "--checkpoint", tmp_path / "ok.flax.safetensors")
        assert code == 2 and len(err) == 1 and why in err[0] and out == "", err
    model.fc.bias[...] = model.fc.bias[...].at[0].set(float("inf"))  # converted files may hold inf
    resnet_flax.save(model, tmp_path / "inf.flax.safetensors")
    code, out, err = predict_cli(capsys, photo, "--checkpoint", tmp_path / "inf.flax.safetensors", "--image-size", 32)
    assert code == 2 and len(err) == 1 and "not finite" in err[0] and "nan" not in out, (out, err)


# ------------------------------------------------------------------------------------------------ workdir


HOLD_LOCK = """
import sys, time
from train.lock import workdir_lock
with workdir_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_one_run_per_workdir_and_the_lock_dies_with_its_holder(tmp_path, capsys):
    from train.lock import workdir_lock

    wd = tmp_path / "wd"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(wd)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = train_cli(capsys, *SMALL, "--dataset", "synthetic", "--max-steps", "1", "--workdir", wd)
        assert code == 2 and len(err) == 1 and f"in use by another run (pid {holder.pid})" in err[0], err
        assert [p.name for p in wd.iterdir()] == [".lock"]  # nothing written by the refused run
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs; the kernel drops the lock
        holder.wait()
    with workdir_lock(wd):
        pass


def _read_only_dir(path: Path) -> Path:
    """A folder this process cannot write into: a read-only tmpfs as root, else mode 0555."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return path
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("root without permission to mount a read-only folder")
    return path


def test_unusable_workdir_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    for wd, why in [(tmp_path / "file", "cannot use --workdir"), (tmp_path / "file" / "sub", "cannot use --workdir")]:
        code, _, err = train_cli(capsys, *SMALL, "--dataset", "synthetic", "--max-steps", "1", "--workdir", wd)
        assert code == 2 and len(err) == 1 and why in err[0], err
    ro = _read_only_dir(tmp_path / "ro")
    try:
        code, _, err = train_cli(capsys, *SMALL, "--dataset", "synthetic", "--max-steps", "1", "--workdir", ro / "wd")
        assert code == 2 and len(err) == 1 and "cannot use --workdir" in err[0], err
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=True)
