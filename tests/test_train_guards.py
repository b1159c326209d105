"""Training refuses or survives what would lose a run or train on something other than the user sees: NaN
stops, image folders with links/nesting/empty classes, two runs on one workdir, changed flags on resume, bad
values, full disks, hostile images and checkpoints given to predict."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train import sources
from train.__main__ import main as train_main
from train.errors import DataError

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


def labelled(splits: sources.Splits) -> list[tuple[str, str]]:
    """(class folder the file really sits in, class name it is labelled with) for every example."""
    out = []
    for src in (splits.train, splits.val):
        for i in range(len(src)):
            rec = src[i]
            out.append((Path(os.path.realpath(rec["image"])).parent.name, splits.class_names[rec["label"]]))
    return out


def one_line_data_error(root: Path, match: str) -> str:
    with pytest.raises(DataError) as info:
        sources.load_splits(data_dir=root)
    msg = str(info.value)
    assert "\n" not in msg and match in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ image folders


def test_symlink_loops_and_repeats_read_each_image_once_with_its_own_label(tmp_path, caplog):
    root = write_folder(tmp_path / "data")
    (root / "red" / "loop").symlink_to(root)  # the loop that turned 24 images into 788
    (root / "green" / "self").symlink_to(root / "green")
    (root / "blue" / "again.jpg").symlink_to(root / "blue" / "0.jpg")
    with caplog.at_level(logging.WARNING, logger="train.folders"):
        splits = sources.load_splits(data_dir=root)
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
    assert sources.load_splits(data_dir=pre).class_names == sorted(CLASSES)


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
        assert "BytesIO" not in err[0], err  # the reason names the file, not our in-memory copy of it
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


# ------------------------------------------------------------------------------------------------ NaN stops


def kept_steps(wd: Path) -> list[int]:
    return sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())


def restored_params(wd: Path, step: int) -> list[np.ndarray]:
    """Every parameter and BatchNorm statistic of checkpoint ``step``, read without any finiteness check."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(wd / "checkpoints") as m:
        state = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return [np.asarray(x) for x in __import__("jax").tree.leaves([state["params"], state["batch_stats"]])]


@pytest.fixture(scope="module")
def nan_workdir(tmp_path_factory):
    """A run whose update at step 5 makes the weights infinite while the loss it reports is still finite (the
    learning rate becomes inf there): the finiteness check must look at the state, not the loss."""
    import jax.numpy as jnp

    import train.steps

    tmp = tmp_path_factory.mktemp("nan")
    folder = write_folder(tmp / "data", per_class=6)
    real = train.steps.lr_schedule

    def blows_up_at_step_5(*args, **kwargs):
        sched = real(*args, **kwargs)
        return lambda count: jnp.where(count >= 4, jnp.inf, sched(count))

    mp = pytest.MonkeyPatch()
    mp.setattr(train.steps, "lr_schedule", blows_up_at_step_5)
    wd, stderr = tmp / "wd", io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            code = train_main([*SMALL, "--data-dir", str(folder), "--max-steps", "9", "--checkpoint-every", "1",
                               "--keep-checkpoints", "2", "--log-every", "1", "--workdir", str(wd)])
    finally:
        mp.undo()
    return code, wd, folder, [line for line in stderr.getvalue().splitlines() if line.startswith("error")]


@pytest.mark.slow
@pytest.mark.xdist_group("nan_workdir")  # one worker builds the shared NaN run
def test_nan_stop_keeps_only_good_checkpoints_and_predict_uses_them(nan_workdir, capsys):
    code, wd, folder, err = nan_workdir
    assert code == 1 and len(err) == 1 and "step 5" in err[0] and "step 4" in err[0], err
    assert kept_steps(wd) == [3, 4]  # the last 2 good ones (3 is also the best); 5 was never written
    for step in kept_steps(wd):
        assert all(np.all(np.isfinite(a)) for a in restored_params(wd, step)), step
    assert not list((wd / "checkpoints").glob("*tmp*"))
    code, out, err = predict_cli(capsys, folder / "red" / "0.jpg", "--checkpoint", wd)
    assert code == 0 and "nan%" not in out and "%" in out, err


@pytest.mark.slow
@pytest.mark.xdist_group("nan_workdir")  # one worker builds the shared NaN run
def test_damaged_or_nonfinite_checkpoints_refused_in_one_line(nan_workdir, capsys, tmp_path):
    import shutil

    import jax
    import orbax.checkpoint as ocp

    _, wd, folder, _ = nan_workdir
    photo = folder / "red" / "0.jpg"
    bad = tmp_path / "bad"
    shutil.copytree(wd, bad)
    for f in (bad / "checkpoints").rglob("*"):  # every stored array replaced by garbage of the same size
        if f.is_file() and "ocdbt" in str(f) and f.stat().st_size > 1000:
            f.write_bytes(os.urandom(f.stat().st_size))
    code, out, err = predict_cli(capsys, photo, "--checkpoint", bad)
    assert code == 2 and len(err) == 1 and "cannot be read" in err[0] and out == "", err
    code, _, err = train_cli(capsys, *SMALL, "--data-dir", folder, "--max-steps", "9", "--workdir", bad)
    assert code == 2 and len(err) == 1 and "cannot be read" in err[0], err
    nan = tmp_path / "nan"
    shutil.copytree(wd, nan)
    with ocp.CheckpointManager(nan / "checkpoints") as m:  # a NaN checkpoint, best by its recorded val_top1
        both = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        r = m.restore(4, args=both)
        nan_params = jax.tree.map(lambda x: np.asarray(x) * np.float32("nan"), r["state"]["params"])
        state = {**r["state"], "params": nan_params}
        m.save(6, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(
            {**r["meta"], "step": 6, "metrics": {"val_top1": 100.0}})))
    for run in (lambda: predict_cli(capsys, photo, "--checkpoint", nan),
                lambda: train_cli(capsys, *SMALL, "--data-dir", folder, "--max-steps", "9", "--workdir", nan)):
        code, out, err = run()
        assert code == 2 and len(err) == 1 and "non-finite" in err[0] and "6" in err[0], err
    (bad / "run.json").write_text('{"model": ')  # truncated
    code, out, err = predict_cli(capsys, photo, "--checkpoint", bad)
    assert code == 2 and len(err) == 1 and "run.json" in err[0], err


@pytest.mark.slow
def test_a_checkpoint_whose_weights_give_a_nonfinite_loss_is_not_kept_as_good(tmp_path, capsys):
    """lr 1e37: step 1's update leaves finite weights of ~1e37 (saved with --checkpoint-every 1) whose loss at
    step 2 is not finite. The step-1 checkpoint must not stay behind as "the last good checkpoint"."""
    folder = write_folder(tmp_path / "data", per_class=6)
    args = [a if a != "1e-3" else "1e37" for a in SMALL]
    code, _, err = train_cli(capsys, *args, "--data-dir", folder, "--max-steps", "4", "--checkpoint-every", "1",
                             "--log-every", "1", "--workdir", tmp_path / "wd")
    assert code == 1 and len(err) == 1 and "loss became non-finite" in err[0], err
    bad = int(err[0].split("at step ")[1].split(";")[0])
    assert f"checkpoint of step {bad - 1}, whose weights gave it, was removed" in err[0], err
    assert kept_steps(tmp_path / "wd") == list(range(1, bad - 1))[-3:]


@pytest.mark.slow
def test_nonfinite_validation_loss_stops_without_saving(tmp_path, capsys):
    # AdamW moves every weight by about lr in its first step: 1e37 keeps the weights finite (checked in the
    # step) but makes every activation overflow, so the final evaluation's loss is NaN.
    folder = write_folder(tmp_path / "data", per_class=6)
    args = [a if a != "1e-3" else "1e37" for a in SMALL]
    code, _, err = train_cli(capsys, *args, "--data-dir", folder, "--max-steps", "1", "--workdir", tmp_path / "wd")
    assert code == 1 and len(err) == 1 and "validation loss" in err[0], err
    assert kept_steps(tmp_path / "wd") == []


# ------------------------------------------------------------------------------------------------ resume rules


@pytest.mark.slow
def test_changed_flags_refused_unless_allowed_and_outputs_get_the_umask_mode(tmp_path, capsys):
    folder = write_folder(tmp_path / "data", per_class=6)
    wd = tmp_path / "wd"
    old = os.umask(0o027)
    try:
        code, out, err = train_cli(capsys, *SMALL, "--data-dir", folder, "--max-steps", "1", "--workdir", wd)
    finally:
        os.umask(old)
    assert code == 0, err
    assert "3 classes: blue, green, red" in out
    for name in ("run.json", "curves.png", "metrics.jsonl"):
        assert (wd / name).stat().st_mode & 0o777 == 0o640, name
    before = (wd / "run.json").read_bytes()
    changed = ["--lr", "2e-3", "--label-smoothing", "0.1", "--weight-decay", "0.01"]
    code, _, err = train_cli(capsys, *SMALL, *changed, "--data-dir", folder, "--max-steps", "2", "--workdir", wd)
    assert code == 2 and len(err) == 1, err
    for flag in ("--lr 0.001 -> 0.002", "--label-smoothing 0.0 -> 0.1", "--weight-decay 0.0 -> 0.01",
                 "--allow-changed-flags"):
        assert flag in err[0], err
    assert (wd / "run.json").read_bytes() == before and kept_steps(wd) == [1]
    code, _, err = train_cli(capsys, *SMALL, "--optimizer", "sgd", "--allow-changed-flags", "--data-dir", folder,
                             "--max-steps", "2", "--workdir", wd)
    assert code == 2 and len(err) == 1 and "--optimizer" in err[0] and "cannot change" in err[0], err
    code, out, err = train_cli(capsys, *SMALL, *changed, "--allow-changed-flags", "--data-dir", folder,
                               "--max-steps", "2", "--workdir", wd)
    assert code == 0 and "--lr 0.001 -> 0.002" in out, err
    assert kept_steps(wd)[-1] == 2 and '"lr": 0.002' in (wd / "run.json").read_text()


@pytest.mark.slow
def test_run_trains_evaluates_and_checkpoints_where_its_schedule_says(tmp_path, capsys):
    """The loop and its reader follow one Schedule: a run stopped mid-epoch and resumed evaluates every second
    epoch and at each end, and checkpoints every 2 steps and after each stretch, at the schedule's positions."""
    import orbax.checkpoint as ocp

    from train.metrics import read_metrics
    from train.schedule import Position, Schedule

    folder = write_folder(tmp_path / "data", per_class=6)  # 15 training images: 3 steps of 4 an epoch
    wd = tmp_path / "wd"
    flags = ["--eval-every-epochs", "2", "--checkpoint-every", "2", "--keep-checkpoints", "20"]
    for max_steps in (4, 8):  # the second run resumes at step 4, mid-epoch 1
        code, _, err = train_cli(capsys, *SMALL, *flags, "--data-dir", folder, "--max-steps", max_steps,
                                 "--workdir", wd)
        assert code == 0, err
    runs = [(Schedule(3, 4, 2, 2), Position()), (Schedule(3, 8, 2, 2), Position(4, 1, 1))]
    plan = [(s, sched) for sched, start in runs for s in sched.stretches(start)]
    evals = [(r["step"], r["epoch"]) for r in read_metrics(wd / "metrics.jsonl") if "val_top1" in r]
    assert evals == [(s.end.step, s.reported_epoch) for s, _ in plan if s.evaluate] == [(4, 2), (6, 2), (8, 3)]
    positions = {s.end.step: s.end for s, _ in plan}
    positions.update({step: s.position_after(step - s.start_step) for s, sched in plan
                      for step in range(s.start_step + 1, s.end.step) if sched.checkpoints_within(s, step)})
    assert kept_steps(wd) == sorted(positions) == [2, 3, 4, 6, 8]
    with ocp.CheckpointManager(wd / "checkpoints") as m:
        for step, want in positions.items():
            meta = m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            assert Position(meta["step"], meta["epoch"], meta["batch"]) == want, step


# ------------------------------------------------------------------------------------------------ bad values


@pytest.mark.parametrize("args,why", [
    (["--lr", "0"], "--lr"), (["--lr", "-1e-3"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--epochs", "-1"], "--epochs"), (["--batch-size", "-8"], "--batch-size"),
    (["--weight-decay", "-0.1"], "--weight-decay"), (["--momentum", "1.5"], "--momentum"),
    (["--warmup-steps", "-1"], "--warmup-steps"), (["--val-fraction", "1"], "--val-fraction"),
    (["--num-workers", "-2"], "--num-workers"), (["--image-size", "0"], "--image-size"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints"), (["--arch", "resnet19"], "resnet18"),
])
def test_nonsense_values_one_line(args, why, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_main([*SMALL, "--dataset", "synthetic", *args, "--workdir", str(tmp_path / "wd")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and why in err[0], err
    assert not (tmp_path / "wd").exists()


def test_default_batch_larger_than_the_folder_one_line(tmp_path, capsys):
    folder = write_folder(tmp_path / "data", per_class=6)
    args = [a for a in SMALL if a not in ("--batch-size", "4")]
    code, _, err = train_cli(capsys, *args, "--data-dir", folder, "--workdir", tmp_path / "wd")
    assert code == 2 and len(err) == 1 and "--batch-size" in err[0] and "15" in err[0], err


# ------------------------------------------------------------------------------------------------ full disk


@pytest.mark.slow
def test_full_disk_while_checkpointing_one_line_and_the_earlier_checkpoint_survives(tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    # A resnet18 + AdamW checkpoint takes 70 MB here (measured): the first fits, the second cannot.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=110m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("root without permission to mount a tmpfs")
    try:
        folder = write_folder(tmp_path / "data", per_class=6)
        code, _, err = train_cli(capsys, *SMALL, "--data-dir", folder, "--max-steps", "4", "--checkpoint-every", "1",
                                 "--workdir", disk / "wd")
        assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
        assert kept_steps(disk / "wd") == [1] and not list((disk / "wd" / "checkpoints").glob("*tmp*"))
        assert all(np.all(np.isfinite(a)) for a in restored_params(disk / "wd", 1))
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_metrics_line_cut_by_a_kill_does_not_stop_the_resume(tmp_path):
    from train.metrics import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train_loss": 1.0}\n{"step": 2, "train_loss": 0.9}\n{"step": 3, "train_lo')
    log = MetricsLog(tmp_path, enabled=True)
    log.truncate_after(2)  # what a resume at step 2 does; the cut line used to raise JSONDecodeError
    log.close()
    assert read_metrics(path) == [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": 0.9}]
