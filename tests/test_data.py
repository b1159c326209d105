"""Input pipeline tests: torchvision parity of the transforms, dataset discovery, and loader determinism.

Every image is generated here (PIL files in tmp_path, synthetic arrays, or TFDS mock data); nothing is downloaded.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train import pipeline, sources, tfds_data
from train import transforms as tr
from train.errors import DataError

MEAN = np.asarray(tr.IMAGENET_MEAN, np.float32)
STD = np.asarray(tr.IMAGENET_STD, np.float32)


# --------------------------------------------------------------------------------------------------- helpers


def _random_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Smooth-ish random RGB image (noise + gradient) so resizes are not trivially flat."""
    noise = rng.integers(0, 256, (height, width, 3))
    ramp = np.linspace(0, 255, width)[None, :, None]
    return Image.fromarray(((noise + ramp) / 2).astype(np.uint8))


def _write_class_folder(root: Path, counts: dict[str, int], size: tuple[int, int] = (40, 30), seed: int = 0) -> None:
    """Write ``counts[class]`` small images per class folder, mixing formats/extension case and nesting."""
    rng = np.random.default_rng(seed)
    exts = [".jpg", ".PNG", ".jpeg", ".bmp"]
    for name, count in counts.items():
        for k in range(count):
            folder = root / name / ("nested" if k % 3 == 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            _random_image(rng, size[1], size[0]).save(folder / f"img{k}{exts[k % len(exts)]}")
        (root / name / "notes.txt").write_text("not an image")


def _labels_in_order(batches: list[dict[str, np.ndarray]]) -> list[int]:
    """Labels of the unmasked examples, in stream order."""
    return [int(lbl) for b in batches for lbl, m in zip(b["label"], b["mask"]) if m > 0]


def _assert_batches_equal(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    """Same number of batches and bitwise-identical arrays under every key."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _indexed_source(n: int) -> sources.SyntheticSource:
    """Synthetic source whose label equals the example index (one class per example)."""
    return sources.SyntheticSource(num_examples=n, num_classes=n, image_size=24)


@dataclass
class RecordingSource:
    """Wraps a source and records which indices were read (to prove resumption skips decoding)."""

    inner: sources.SyntheticSource
    seen: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict:
        with self.lock:
            self.seen.add(index)
        return self.inner[index]


class TorchDraws:
    """Feeds ``random_resized_crop_params``/``train_transform`` the same draws torchvision makes from torch's RNG."""

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def uniform(self, low: float, high: float) -> float:
        return self.torch.empty(1).uniform_(low, high).item()

    def integers(self, low: int, high: int) -> int:
        return int(self.torch.randint(low, high, size=(1,)).item())


# --------------------------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("hw", [(300, 400), (500, 333), (256, 256), (100, 150), (37, 61), (224, 224)])
def test_eval_transform_matches_torchvision_exactly(hw: tuple[int, int]) -> None:
    torch = pytest.importorskip("torch")
    from torchvision import transforms as T

    img = _random_image(np.random.default_rng(hw[0]), *hw)
    ref = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(tr.IMAGENET_MEAN, tr.IMAGENET_STD)])
    expected = ref(img).permute(1, 2, 0).numpy()
    got = tr.eval_transform(img, 224)
    assert got.dtype == np.float32 and got.shape == (224, 224, 3)
    assert np.abs(got - expected).max() < 1e-6  # bit-exact in practice (0.0 measured)
    assert torch.is_tensor(ref(img))


def test_center_crop_pads_like_torchvision_when_resize_is_smaller_than_crop() -> None:
    pytest.importorskip("torch")
    from torchvision import transforms as T

    img = _random_image(np.random.default_rng(1), 90, 70)
    expected = np.asarray(T.CenterCrop(64)(T.Resize(51)(img)))
    got = np.asarray(tr.center_crop(tr.resize_shorter(img, 51), 64))
    np.testing.assert_array_equal(got, expected)


def test_resized_output_size_matches_torchvision() -> None:
    pytest.importorskip("torch")
    from torchvision.transforms.functional import _compute_resized_output_size

    for h, w in [(375, 500), (500, 375), (333, 500), (1, 1000), (256, 256), (257, 255)]:
        assert tr.resized_output_size(h, w, 256) == tuple(_compute_resized_output_size((h, w), [256]))


def test_random_resized_crop_params_match_torchvision_given_same_draws() -> None:
    torch = pytest.importorskip("torch")
    from torchvision import transforms as T

    for k, (h, w) in enumerate([(300, 400), (500, 333), (20, 700), (64, 64)] * 250):
        torch.manual_seed(k)
        expected = T.RandomResizedCrop.get_params(torch.empty(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
        torch.manual_seed(k)
        assert tr.random_resized_crop_params(h, w, TorchDraws()) == tuple(expected)


def test_train_transform_matches_torchvision_given_same_draws() -> None:
    torch = pytest.importorskip("torch")
    from torchvision import transforms as T

    img = _random_image(np.random.default_rng(2), 180, 240)
    ref = T.Compose(
        [
            T.RandomResizedCrop(64),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(tr.IMAGENET_MEAN, tr.IMAGENET_STD),
        ]
    )
    for seed in range(40):
        torch.manual_seed(seed)
        expected = ref(img).permute(1, 2, 0).numpy()
        torch.manual_seed(seed)
        np.testing.assert_array_equal(tr.train_transform(img, 64, TorchDraws()), expected)


def _crop_stats(params: list[tuple[int, int, int, int]], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(area fraction, log aspect ratio) of each crop."""
    area = np.array([h * w / (height * width) for _, _, h, w in params])
    log_aspect = np.log([w / h for _, _, h, w in params])
    return area, log_aspect


def test_random_resized_crop_statistics_match_torchvision() -> None:
    torch = pytest.importorskip("torch")
    from torchvision import transforms as T

    height, width, n = 300, 400, 4000
    rng = np.random.default_rng(0)
    ours = [tr.random_resized_crop_params(height, width, rng) for _ in range(n)]
    torch.manual_seed(0)
    theirs = [
        T.RandomResizedCrop.get_params(torch.empty(3, height, width), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)
    ]
    assert all(top >= 0 and left >= 0 and top + h <= height and left + w <= width for top, left, h, w in ours)
    area, log_aspect = _crop_stats(ours, height, width)
    ref_area, ref_log_aspect = _crop_stats(theirs, height, width)
    assert area.min() >= 0.07 and area.max() <= 1.0
    assert np.abs(log_aspect).max() <= np.log(4 / 3) + 0.02
    # Means differ by sampling noise only: std(area) ~ 0.22 -> SE of a difference ~ 0.005 at n=4000.
    assert abs(area.mean() - ref_area.mean()) < 0.02  # both ~0.435 (rejection of oversize crops lowers U(.08,1))
    assert abs(log_aspect.mean() - ref_log_aspect.mean()) < 0.02
    assert abs(area.std() - ref_area.std()) < 0.02


def test_train_transform_shape_range_and_flip_rate() -> None:
    img = _random_image(np.random.default_rng(3), 50, 70)
    outs = [tr.train_transform(img, 32, np.random.default_rng(s)) for s in range(200)]
    assert all(o.shape == (32, 32, 3) and o.dtype == np.float32 for o in outs)
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert all((o >= lo - 1e-6).all() and (o <= hi + 1e-6).all() for o in outs)
    # Same seed -> same output; the flip decision is the last draw, so count it by replaying the draws.
    np.testing.assert_array_equal(tr.train_transform(img, 32, np.random.default_rng(7)), outs[7])
    flips = 0
    for s in range(200):
        rng = np.random.default_rng(s)
        tr.random_resized_crop_params(50, 70, rng)
        flips += rng.uniform(0.0, 1.0) < 0.5
    assert 70 < flips < 130


def test_normalize_matches_imagenet_stats() -> None:
    pixels = np.array([[[0, 0, 0], [255, 255, 255], [124, 116, 104]]], np.uint8)
    out = tr.normalize(pixels)
    np.testing.assert_allclose(out[0, 0], -MEAN / STD, rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], (1 - MEAN) / STD, rtol=1e-6)
    assert np.abs(out[0, 2]).max() < 0.02  # ~ the mean colour maps to ~0


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_load_image_converts_any_mode_to_rgb(mode: str, tmp_path: Path) -> None:
    img = _random_image(np.random.default_rng(4), 20, 30).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        img = Image.fromarray(np.full((20, 30), 1000, np.uint16))
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    for source in (str(path), path.read_bytes()):
        out = tr.load_image(source)
        assert out.mode == "RGB" and out.size == (30, 20)


def test_load_image_accepts_arrays() -> None:
    assert tr.load_image(np.zeros((5, 6), np.uint8)).size == (6, 5)
    assert tr.load_image(np.zeros((5, 6, 1), np.uint8)).mode == "RGB"
    rgba = np.full((5, 6, 4), 200, np.uint8)
    assert np.asarray(tr.load_image(rgba)).shape == (5, 6, 3)


# --------------------------------------------------------------------------------------------------- datasets


def test_folder_class_names_and_stratified_split(tmp_path: Path) -> None:
    _write_class_folder(tmp_path, {"cat": 10, "dog": 5, "axolotl": 6})
    (tmp_path / ".hidden").mkdir()
    splits = sources.load_splits(data_dir=tmp_path, val_fraction=0.2)
    assert splits.class_names == ["axolotl", "cat", "dog"] and splits.num_classes == 3
    assert len(splits.train) + len(splits.val) == 21  # .txt files ignored, nested + upper-case ext found
    val_per_class = np.bincount([splits.val[i]["label"] for i in range(len(splits.val))], minlength=3)
    assert val_per_class.tolist() == [1, 2, 1]  # round(6*.2), round(10*.2), round(5*.2)
    train_paths = {splits.train[i]["image"] for i in range(len(splits.train))}
    val_paths = {splits.val[i]["image"] for i in range(len(splits.val))}
    assert not train_paths & val_paths
    for i in range(len(splits.train)):
        record = splits.train[i]
        assert Path(record["image"]).relative_to(tmp_path).parts[0] == splits.class_names[record["label"]]
    again = sources.load_splits(data_dir=tmp_path, val_fraction=0.2)
    assert again.val == splits.val and again.train == splits.train  # deterministic split


def test_folder_with_train_and_val_subfolders_is_used_as_is(tmp_path: Path) -> None:
    _write_class_folder(tmp_path / "train", {"a": 4, "b": 3})
    _write_class_folder(tmp_path / "val", {"a": 2, "b": 1}, seed=1)
    splits = sources.load_splits(data_dir=str(tmp_path))
    assert splits.class_names == ["a", "b"]
    assert len(splits.train) == 7 and len(splits.val) == 3
    assert all("/val/" in splits.val[i]["image"] for i in range(3))
    assert [splits.val[i]["label"] for i in range(3)] == [0, 0, 1]


def test_folder_with_validation_subfolder_is_recognised(tmp_path: Path) -> None:
    _write_class_folder(tmp_path / "train", {"a": 2, "b": 1})
    _write_class_folder(tmp_path / "validation", {"a": 1, "b": 1})
    splits = sources.load_splits(data_dir=tmp_path)
    assert (len(splits.train), len(splits.val), splits.class_names) == (3, 2, ["a", "b"])


def _one_line_error(match: str, **kwargs) -> str:
    """Call load_splits expecting a one-line DataError whose message contains ``match``."""
    with pytest.raises(DataError) as info:
        sources.load_splits(**kwargs)
    message = str(info.value)
    assert "\n" not in message and match in message
    return message


def test_missing_folder_raises_one_line_data_error(tmp_path: Path) -> None:
    message = _one_line_error("does not exist", data_dir=tmp_path / "nope")
    assert "DIR/<class>" in message


def test_empty_folder_and_folder_without_images_raise(tmp_path: Path) -> None:
    _one_line_error("no class sub-folders", data_dir=tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    _one_line_error("no images", data_dir=tmp_path)


def test_unknown_tfds_name_raises_one_line_data_error() -> None:
    message = _one_line_error("unknown dataset", dataset="definitely_not_a_dataset")
    assert "--data-dir" in message


def test_unprepared_manual_tfds_dataset_explains_how_to_get_it(tmp_path: Path) -> None:
    message = _one_line_error("not prepared", dataset="imagenet2012", tfds_data_dir=str(tmp_path))
    assert "tfds build imagenet2012" in message and "manual_dir" in message


def test_unprepared_tfds_dataset_that_cannot_download_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tfds = pytest.importorskip("tensorflow_datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host\nsecond line of a long traceback-ish message")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    message = _one_line_error("could not be built here", dataset="tf_flowers", tfds_data_dir=str(tmp_path))
    assert "ConnectionError: no route to host" in message and "tfds build tf_flowers" in message


def test_tf_flowers_first_build_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TFDS's real tf_flowers builder on a local archive: prepares and loads when TensorFlow is installed,
    otherwise stops with a one-line message naming the install command."""
    import importlib.util
    import tarfile

    tfds = pytest.importorskip("tensorflow_datasets")
    photos = tmp_path / "flower_photos"
    for name in ("daisy", "roses"):
        (photos / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(photos / name / f"{i}.jpg")
    archive = tmp_path / "flower_photos.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(photos, arcname="flower_photos")
    monkeypatch.setattr(tfds.download.DownloadManager, "download", lambda self, url: str(archive))
    if importlib.util.find_spec("tensorflow") is None:
        message = _one_line_error("needs TensorFlow", dataset="tf_flowers", tfds_data_dir=str(tmp_path / "d"))
        assert "pip install 'resnet-flax[tfds]'" in message and "--data-dir" in message
    else:
        splits = sources.load_splits("tf_flowers", tfds_data_dir=str(tmp_path / "d"))
        assert len(splits.train) + len(splits.val) == 6


def test_tfds_tf_flowers_through_mock_data() -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=10):
        splits = sources.load_splits("tf_flowers")
        assert splits.class_names == ["dandelion", "daisy", "tulips", "sunflowers", "roses"]
        assert len(splits.train) == 10 and len(splits.val) == 10  # the mock ignores split slicing
        record = splits.train[0]
        assert record["image"].dtype == np.uint8 and record["image"].ndim == 3
        batches = list(pipeline.make_loader(splits.train, batch_size=4, image_size=32, train=True, seed=0))
    assert len(batches) == 2
    assert batches[0]["image"].shape == (4, 32, 32, 3) and batches[0]["mask"].tolist() == [1.0] * 4
    assert set(batches[0]["label"].tolist()) <= set(range(5))


def test_tfds_split_names() -> None:
    assert tfds_data.split_names({"train": 1, "validation": 1}, 0.2, "x") == ("train", "validation")
    assert tfds_data.split_names({"train": 1, "test": 1}, 0.2, "x") == ("train", "test")
    assert tfds_data.split_names({"train": 1}, 0.2, "x") == ("train[:80%]", "train[80%:]")


def test_synthetic_splits_are_deterministic_and_distinct() -> None:
    splits = sources.load_splits("synthetic", synthetic_size=20, synthetic_classes=4, val_fraction=0.25)
    assert (len(splits.train), len(splits.val), splits.num_classes) == (20, 5, 4)
    a, b = splits.train[3], sources.load_splits("synthetic", synthetic_size=20, synthetic_classes=4).train[3]
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["image"].dtype == np.uint8 and a["label"] == 3
    assert not np.array_equal(splits.train[0]["image"], splits.val[0]["image"])


# --------------------------------------------------------------------------------------------------- loaders


def _load(source, **kwargs) -> list[dict[str, np.ndarray]]:
    """All batches of one epoch as a list (small images, fixed seed unless overridden)."""
    kwargs = {"image_size": 16, "seed": 0, **kwargs}
    return list(pipeline.make_loader(source, **kwargs))


def test_train_batches_have_expected_shapes_and_drop_remainder() -> None:
    batches = _load(_indexed_source(22), batch_size=4, train=True)
    assert len(batches) == pipeline.steps_per_epoch(22, 4) == 5
    b = batches[0]
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["mask"].dtype == np.float32 and b["corrupt"].dtype == np.int32
    assert len(set(_labels_in_order(batches))) == 20


def test_same_seed_and_epoch_is_deterministic_and_epochs_differ() -> None:
    source = _indexed_source(32)
    first = _load(source, batch_size=8, train=True, epoch=3)
    _assert_batches_equal(first, _load(source, batch_size=8, train=True, epoch=3))
    other_epoch = _load(source, batch_size=8, train=True, epoch=4)
    other_seed = _load(source, batch_size=8, train=True, epoch=3, seed=1)
    assert _labels_in_order(first) != _labels_in_order(other_epoch)
    assert _labels_in_order(first) != _labels_in_order(other_seed)
    assert sorted(_labels_in_order(first)) == sorted(_labels_in_order(other_epoch)) == list(range(32))


def test_resume_from_start_batch_matches_uninterrupted_stream_and_skips_decoding() -> None:
    full = _load(_indexed_source(40), batch_size=4, train=True, epoch=1)
    recording = RecordingSource(_indexed_source(40))
    resumed = _load(recording, batch_size=4, train=True, epoch=1, start_batch=6)
    _assert_batches_equal(resumed, full[6:])
    skipped = set(_labels_in_order(full[:6]))
    assert recording.seen and not recording.seen & skipped


def test_worker_processes_give_identical_batches(tmp_path: Path) -> None:
    _write_class_folder(tmp_path, {"a": 7, "b": 6})
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    source = sources.load_splits(data_dir=tmp_path, val_fraction=0.0).train
    in_process = _load(source, batch_size=4, train=True, epoch=2)
    with_workers = _load(source, batch_size=4, train=True, epoch=2, num_workers=2)
    _assert_batches_equal(in_process, with_workers)
    eval_in_process = _load(source, batch_size=4, train=False)
    _assert_batches_equal(eval_in_process, _load(source, batch_size=4, train=False, num_workers=2))


@pytest.mark.parametrize("train", [True, False])
def test_host_shares_concatenate_to_the_global_batch(train: bool) -> None:
    source = _indexed_source(27)
    single = _load(source, batch_size=6, train=train, epoch=5)
    shares = [_load(source, batch_size=6, train=train, epoch=5, process_index=p, process_count=3) for p in range(3)]
    assert all(len(s) == len(single) for s in shares)
    for k, batch in enumerate(single):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([s[k][key] for s in shares]), batch[key])
    assert shares[0][0]["image"].shape == (2, 16, 16, 3)


def test_eval_pads_last_batch_and_covers_each_example_once() -> None:
    source = _indexed_source(11)
    batches = _load(source, batch_size=4, train=False)
    assert len(batches) == pipeline.steps_per_epoch(11, 4, train=False) == 3
    assert batches[-1]["mask"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert np.all(batches[-1]["image"][3] == 0) and batches[-1]["corrupt"].sum() == 0
    assert _labels_in_order(batches) == list(range(11))  # eval keeps source order
    multi_host = [_load(source, batch_size=4, train=False, process_index=p, process_count=2) for p in range(2)]
    assert sorted(_labels_in_order(multi_host[0]) + _labels_in_order(multi_host[1])) == list(range(11))


def test_eval_batches_match_eval_transform(tmp_path: Path) -> None:
    _write_class_folder(tmp_path, {"a": 2, "b": 1})
    source = sources.load_splits(data_dir=tmp_path, val_fraction=0.0).train
    batch = _load(source, batch_size=3, train=False, image_size=24, resize_size=28)[0]
    for i in range(3):
        expected = tr.eval_transform(tr.load_image(source[i]["image"]), 24, 28)
        np.testing.assert_array_equal(batch["image"][i], expected)


def test_corrupt_image_is_masked_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_class_folder(tmp_path, {"a": 3, "b": 3})
    bad = tmp_path / "b" / "zz_corrupt.jpg"
    bad.write_bytes(b"\xff\xd8garbage bytes, not an image")
    source = sources.load_splits(data_dir=tmp_path, val_fraction=0.0).train
    bad_index = next(i for i in range(len(source)) if source[i]["image"] == str(bad))
    with caplog.at_level(logging.WARNING, logger="train.pipeline"):
        batches = _load(source, batch_size=7, train=False)
        train_batches = _load(source, batch_size=7, train=True)
    batch = batches[0]
    assert batch["mask"][bad_index] == 0 and batch["corrupt"][bad_index] == 1
    assert batch["corrupt"].sum() == 1 and batch["mask"].sum() == 6
    assert np.all(batch["image"][bad_index] == 0)
    assert train_batches[0]["corrupt"].sum() == 1 and train_batches[0]["mask"].sum() == 6
    warnings = [r.getMessage() for r in caplog.records if "zz_corrupt.jpg" in r.getMessage()]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)  # one line per bad file per pass


def test_truncated_jpeg_is_corrupt_not_fatal(tmp_path: Path) -> None:
    _write_class_folder(tmp_path, {"a": 2, "b": 1}, size=(64, 64))
    good = min((tmp_path / "a").glob("*.jpg"))
    (tmp_path / "a" / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    source = sources.load_splits(data_dir=tmp_path, val_fraction=0.0).train
    batch = _load(source, batch_size=3, train=False)[0]
    assert batch["corrupt"].sum() == 1 and batch["mask"].sum() == 2


def test_batch_size_must_split_across_processes_and_fit_the_data() -> None:
    with pytest.raises(DataError, match="multiple of 4"):
        pipeline.make_loader(_indexed_source(40), batch_size=10, image_size=16, train=True, seed=0, process_count=4)
    with pytest.raises(DataError, match="fewer than one global batch"):
        pipeline.make_loader(_indexed_source(3), batch_size=4, image_size=16, train=True, seed=0)


def test_steps_per_epoch() -> None:
    assert pipeline.steps_per_epoch(10, 4) == 2
    assert pipeline.steps_per_epoch(10, 4, train=False) == 3
    assert pipeline.steps_per_epoch(8, 4, train=False) == 2
    assert pipeline.steps_per_epoch(3, 4) == 0



def test_default_tfds_dataset_offline_fails_fast_in_one_whole_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """`python -m train --arch resnet34` with no network: a few download attempts (TFDS alone retries ten
    times with back-off, 3.5 minutes), one whole line that names the [tfds] extra, and nothing left behind."""
    import socket

    pytest.importorskip("tensorflow_datasets")
    from train.__main__ import main as train_main

    lookups = []

    def no_network(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    root = tmp_path / "tfds"
    code = train_main(["--arch", "resnet34", "--tfds-data-dir", str(root), "--workdir", str(tmp_path / "wd")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1, err
    assert "not prepared" in err[0] and "pip install 'resnet-flax[tfds]'" in err[0] and "--data-dir" in err[0]
    cause = err[0][err[0].index("could not be built here (") + 25:err[0].index("); preparing")]
    assert cause.startswith("ConnectionError: ") and (cause.endswith("...") or cause.endswith(")")), cause
    assert 1 <= len(lookups) <= 3, lookups
    assert not root.exists() or not any(root.rglob("*")), sorted(root.rglob("*"))
    assert not (tmp_path / "wd").exists()
