"""The run-long input pipeline: one grain iterator per run, uint8 hosts + normalisation on the device, reduced
JPEG decoding for training crops, in-memory small datasets.
Images are generated here."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from train import grain_workers, pipeline, sources
from train import transforms as tr
from train.pipeline import RunData
from train.schedule import Position, Schedule, Segment
from train.sources import Splits
from train.steps import normalize_images


def _photo(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A smooth photo-like image (bicubic-upsampled colour field plus mild noise)."""
    coarse = rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    return Image.fromarray(np.clip(smooth + rng.integers(-4, 5, smooth.shape), 0, 255).astype(np.uint8))


def _folder(root: Path, per_class: int = 6, size: tuple[int, int] = (40, 30)) -> Splits:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            _photo(rng, size[1], size[0]).save(root / name / f"{k}.jpg", quality=90)
    return sources.load_splits(data_dir=root, val_fraction=0.34)


def _same(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_schedule_follows_the_loop():
    train, val = Segment("train", 0, 0, 5), Segment("val")
    assert Schedule(5, 10).segments(Position(0, 0, 0)) == [train, val, Segment("train", 1, 0, 5), val]
    # resumed mid-epoch 1, stopping mid-epoch 2 (--max-steps 12), evaluating every second epoch and at the end
    assert Schedule(5, 12, eval_every_epochs=2).segments(Position(7, 1, 2)) == [
        Segment("train", 1, 2, 5), val, Segment("train", 2, 0, 2), val]
    assert Schedule(5, 15, eval_every_epochs=2).segments(Position(0, 0, 0)) == [
        train, Segment("train", 1, 0, 5), val, Segment("train", 2, 0, 5), val]
    assert Schedule(5, 10).segments(Position(10, 2, 0)) == []


def test_schedule_stretches_are_its_segments_with_positions_and_checkpoints():
    schedule = Schedule(5, 12, eval_every_epochs=2, checkpoint_every=4)
    stretches = list(schedule.stretches(Position(7, 1, 2)))
    assert [(s.train, s.start_step, s.end, s.evaluate, s.reported_epoch) for s in stretches] == [
        (Segment("train", 1, 2, 5), 7, Position(10, 2, 0), True, 2),
        (Segment("train", 2, 0, 2), 10, Position(12, 2, 2), True, 3)]
    assert schedule.segments(Position(7, 1, 2)) == [stretches[0].train, Segment("val"), stretches[1].train,
                                                    Segment("val")]
    assert stretches[0].position_after(1) == Position(8, 1, 3) and schedule.num_epochs == 3
    # every 4 steps, except at a stretch's end (step 12), which the loop saves after the evaluation anyway
    assert [step for s in stretches for step in range(s.start_step + 1, s.end.step + 1)
            if schedule.checkpoints_within(s, step)] == [8]
    # resumed past the epoch's end (a larger --batch-size): no batch read, the next epoch, no step lost or gained
    first = next(Schedule(3, 8).stretches(Position(4, 1, 5)))
    assert first.num_batches == 0 and first.end == Position(4, 2, 0)
    with pytest.raises(ValueError):
        Schedule(0, 10)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_run_data_is_make_loader_per_segment_from_one_iterator(tmp_path, monkeypatch, num_workers):
    splits = _folder(tmp_path)
    (tmp_path / "a" / "zz_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    splits = sources.load_splits(data_dir=tmp_path, val_fraction=0.34)
    schedule = Schedule(2, 5).segments(Position(1, 0, 1))  # resumed at epoch 0, batch 1; 2 batches of 3 an epoch
    iterators = []
    real_iterate = grain_workers.iterate
    monkeypatch.setattr(grain_workers, "iterate",
                        lambda ds, n, **kw: iterators.append(n) or real_iterate(ds, n, **kw))
    common = {"batch_size": 3, "image_size": 16, "seed": 4}
    run = RunData(splits, schedule, num_workers=num_workers, **common)
    got, want = [], []
    try:
        for seg in schedule:
            got.append(list(run.val() if seg.kind == "val" else run.train(seg.epoch, seg.start)))
    finally:
        run.close()
    assert iterators == [num_workers]  # one grain iterator (one set of worker processes) for the whole run
    for seg in schedule:
        if seg.kind == "train":
            want.append(list(pipeline.make_loader(splits.train, train=True, epoch=seg.epoch, start_batch=seg.start,
                                              normalize=False, **common))[: seg.stop - seg.start])
        else:
            want.append(list(pipeline.make_loader(splits.val, train=False, normalize=False, **common)))
    for g, w in zip(got, want):
        _same(g, w)
    assert got[0][0]["image"].dtype == np.uint8


def test_batch_spec_is_what_a_run_feeds_its_steps(tmp_path):
    """--compile-only compiles the steps for train.mesh.batch_spec: the dtypes and shapes RunData yields."""
    from train.mesh import batch_spec, device_batch, make_mesh

    splits = _folder(tmp_path)
    run = RunData(splits, Schedule(2, 1).segments(Position()), batch_size=3, image_size=16, seed=0)
    try:
        (batch,) = list(run.train(0, 0))
    finally:
        run.close()
    _, sharding = make_mesh(jax.devices()[:1])
    spec = batch_spec(3, 16, sharding)
    got = device_batch(batch)
    assert set(spec) == set(got)
    for key, value in got.items():
        assert (spec[key].shape, spec[key].dtype) == (value.shape, value.dtype), key
    assert spec["image"].dtype == np.uint8


@pytest.mark.parametrize("resize, crop", [(None, None), (29, 24), (20, 24)])  # default; V2's kind; crop > resize
def test_evaluation_is_torchvisions_val_resize_and_crop(tmp_path, resize, crop):
    """--val-resize-size / --val-crop-size (torchvision's names): RunData's evaluation images are torchvision's
    Resize + CenterCrop of the same files, pixel for pixel (zero-padded where the crop exceeds the resized image);
    without them, resize to crop * 256/224 and centre-crop the training size. Training keeps --image-size."""
    pytest.importorskip("torch")
    from torchvision import transforms as T

    splits = _folder(tmp_path)  # 40x30 JPEGs
    segments = Schedule(2, 1).segments(Position())
    run = RunData(splits, segments, batch_size=3, image_size=16, seed=0, resize_size=resize, val_image_size=crop)
    try:
        train = list(run.train(0, 0))
        val = list(run.val())
    finally:
        run.close()
    size = crop or 16
    ref = T.Compose([T.Resize(resize or int(size * 256 / 224)), T.CenterCrop(size)])
    want = np.stack([np.asarray(ref(tr.load_image(splits.val[i]["image"]))) for i in range(len(splits.val))])
    got = np.concatenate([b["image"][b["mask"] > 0] for b in val])
    np.testing.assert_array_equal(got, want)
    assert train[0]["image"].shape[1:] == (16, 16, 3)


def test_run_data_refuses_a_segment_out_of_order(tmp_path):
    splits = _folder(tmp_path)
    run = RunData(splits, Schedule(2, 4).segments(Position()), batch_size=3, image_size=16, seed=0)
    with pytest.raises(RuntimeError, match="schedule"):
        run.val()
    run.close()


def test_device_normalisation_matches_torchvision_eval_transform():
    pytest.importorskip("torch")
    from torchvision import transforms as T

    ref = T.Compose([T.Resize(73), T.CenterCrop(64), T.ToTensor(), T.Normalize(tr.IMAGENET_MEAN, tr.IMAGENET_STD)])
    rng = np.random.default_rng(5)
    images = [_photo(rng, h, w) for h, w in [(90, 120), (120, 77), (64, 64)]]
    pixels = np.stack([tr.eval_crop(img, 64, 73) for img in images])
    mask = np.array([1.0, 1.0, 0.0], np.float32)
    got = np.asarray(jax.jit(normalize_images)(pixels, mask))
    expected = np.stack([ref(img).permute(1, 2, 0).numpy() for img in images])
    # The same float32 operations in the same order as ToTensor + Normalize: 0.0 measured; 1e-6 is 4 ulp at |x| 2.6.
    assert np.abs(got[:2] - expected[:2]).max() <= 1e-6
    assert np.all(got[2] == 0)  # masked-out examples are zeros, as the host transform's blanks


def test_draft_scale():
    assert [tr.draft_scale(h, 300, 64) for h in (64, 127, 128, 255, 256, 511, 512, 4000)] == [1, 1, 2, 2, 4, 4, 4, 4]
    assert tr.draft_scale(1000, 1000, 100) == 8


def test_train_crop_decodes_big_jpegs_at_reduced_scale_with_the_same_crop():
    img = _photo(np.random.default_rng(1), 768, 1024)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    jpeg = buf.getvalue()
    decoded_sizes = []
    real_to_rgb = tr.to_rgb

    def spy(image: Image.Image) -> Image.Image:
        out = real_to_rgb(image)
        decoded_sizes.append(out.size)
        return out

    diffs = []
    for seed in range(12):
        decoded_sizes.clear()
        tr.to_rgb = spy
        try:
            fast = tr.train_crop(tr.open_image(jpeg), 48, np.random.default_rng(seed))
        finally:
            tr.to_rgb = real_to_rgb
        exact = tr.train_crop(tr.load_image(jpeg), 48, np.random.default_rng(seed))  # decoded: torchvision's path
        h, w = tr.random_resized_crop_params(768, 1024, np.random.default_rng(seed))[2:]
        assert decoded_sizes[0][0] == 1024 // tr.draft_scale(h, w, 48)
        assert fast.shape == exact.shape == (48, 48, 3) and fast.dtype == np.uint8
        diffs.append(np.abs(fast.astype(np.int16) - exact).mean())
    assert any(s < 1024 for s in (1024 // tr.draft_scale(*tr.random_resized_crop_params(
        768, 1024, np.random.default_rng(seed))[2:], 48) for seed in range(12)))
    # Resampling differences only (DCT-domain scaling, then bilinear): mean 2.3, worst 3.2 grey levels over 60
    # seeds on this image; the same crop flipped differs by >= 44, shifted by a tenth of its width by >= 28.
    assert max(diffs) < 8.0, diffs


def test_small_folders_are_held_in_memory_and_read_the_same(tmp_path, caplog):
    splits = _folder(tmp_path)
    held = sources.in_memory(splits.train)
    assert isinstance(held, sources.BytesSource) and len(held) == len(splits.train)
    assert sources.in_memory(splits.train, limit=100) is splits.train  # over the limit: read from disk
    common = {"batch_size": 4, "image_size": 16, "seed": 1, "train": True, "epoch": 3}
    _same(list(pipeline.make_loader(held, **common)), list(pipeline.make_loader(splits.train, **common)))
    Path(splits.train.paths[0]).write_bytes(b"not an image")
    broken = sources.in_memory(splits.train)
    with caplog.at_level(logging.WARNING, logger="train.pipeline"):
        batches = list(pipeline.make_loader(broken, **{**common, "train": False}))
    assert sum(int(b["corrupt"].sum()) for b in batches) == 1
    assert any(splits.train.paths[0] in r.getMessage() for r in caplog.records)  # named by its path
