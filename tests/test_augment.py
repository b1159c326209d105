"""train.augment against torchvision itself: every op and magnitude, the policies' draws, random erasing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomErasing
from torchvision.transforms import autoaugment as tv_aa

from train.augment import (
    AUTO_AUGMENT_POLICIES,
    Augment,
    apply_op,
    augmentation_space,
    auto_augment,
    erase,
    erase_box,
    rand_augment,
    trivial_augment_wide,
)

MODES = {"bilinear": InterpolationMode.BILINEAR, "nearest": InterpolationMode.NEAREST}


class TorchDraws:
    """Draws from torch's global generator, one call per draw as torchvision makes it, so a seed gives both sides
    the same op indices, bins, signs, probabilities and boxes."""

    def integers(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,)).item())

    def uniform(self, low: float, high: float) -> float:
        return torch.empty(1).uniform_(low, high).item()


def photo(height: int = 19, width: int = 26, seed: int = 0) -> Image.Image:
    """A small non-square RGB image with smooth gradients and noise (so every op changes pixels)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


def tv_space(kind: str, height: int, width: int) -> dict:
    if kind == "ta_wide":
        return tv_aa.TrivialAugmentWide()._augmentation_space(31)
    if kind == "ra":
        return tv_aa.RandAugment()._augmentation_space(31, (height, width))
    return tv_aa.AutoAugment()._augmentation_space(10, (height, width))


def test_magnitude_tables_equal_torchvisions():
    """Every magnitude of every op, bit for bit (torch.linspace's float32 rounding decides int() translations)."""
    for kind in ("ta_wide", "ra", "aa"):
        for height, width in [(h, h + 7) for h in range(1, 400)] if kind != "ta_wide" else [(19, 26)]:
            ours, theirs = augmentation_space(kind, 31 if kind != "aa" else 10, height, width), tv_space(kind, height,
                                                                                                          width)
            assert list(ours) == list(theirs), kind
            for name, (magnitudes, signed) in ours.items():
                want, want_signed = theirs[name]
                assert signed == want_signed
                if magnitudes is None:
                    assert want.ndim == 0
                else:
                    np.testing.assert_array_equal(magnitudes, want.numpy(), err_msg=f"{kind} {name} {height}x{width}")


def test_auto_augment_policies_equal_torchvisions():
    for name, subs in AUTO_AUGMENT_POLICIES.items():
        assert subs == [tuple(op) for op in tv_aa.AutoAugment(tv_aa.AutoAugmentPolicy(name)).policies]


@pytest.mark.parametrize("mode", MODES)
def test_each_op_at_each_magnitude_equals_torchvision(mode):
    """Each op at every magnitude any policy uses, both signs, on the same PIL image: identical pixels."""
    img, grey = photo(), photo().convert("L")
    h, w = img.height, img.width
    values: dict[str, set[float]] = {}
    for kind in ("ta_wide", "ra", "aa"):
        for name, (magnitudes, signed) in augmentation_space(kind, 31 if kind != "aa" else 10, h, w).items():
            mags = [0.0] if magnitudes is None else [float(m) for m in magnitudes]
            values.setdefault(name, set()).update(mags + ([-m for m in mags] if signed else []))
    checked = 0
    for name, mags in values.items():
        for m in sorted(mags):
            for image in (img, grey):
                want = tv_aa._apply_op(image, name, m, interpolation=MODES[mode], fill=None)
                got = apply_op(image, name, m, mode)
                assert got.mode == want.mode and got.size == want.size
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"{name} {m}")
                checked += 1
    assert len(values) == 15 and checked > 1000


@pytest.mark.parametrize("policy", ["ta_wide", "ra0", "ra9", "ra30", "imagenet", "cifar10", "svhn"])
def test_policy_with_the_same_draws_equals_torchvision(policy):
    """The same seeded torch draws drive torchvision's transform and ours: the same pixels, seed after seed."""
    if policy == "ta_wide":
        theirs, ours = tv_aa.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR), trivial_augment_wide
    elif policy.startswith("ra"):
        m = int(policy[2:])
        theirs = tv_aa.RandAugment(magnitude=m, interpolation=InterpolationMode.BILINEAR)
        ours = lambda img, rng: rand_augment(img, rng, m)  # noqa: E731
    else:
        theirs = tv_aa.AutoAugment(tv_aa.AutoAugmentPolicy(policy), interpolation=InterpolationMode.BILINEAR)
        ours = lambda img, rng: auto_augment(img, rng, policy)  # noqa: E731
    changed = 0
    for seed in range(150):
        img = photo(seed=seed % 5)
        torch.manual_seed(seed)
        want = np.asarray(theirs(img))
        after_theirs = torch.rand(1).item()
        torch.manual_seed(seed)
        got = np.asarray(ours(img, TorchDraws()))
        assert torch.rand(1).item() == after_theirs, f"seed {seed}: another number of draws than torchvision"
        np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}")
        changed += not np.array_equal(got, np.asarray(img))
    assert changed > 50  # magnitude bin 0 leaves most ops (not AutoContrast, Equalize) idle


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_random_erasing_with_the_same_draws_equals_torchvision(p):
    """RandomErasing(p) on a normalised CHW tensor vs our box zeroed in the HWC array: identical values."""
    rng = np.random.default_rng(0)
    erased = 0
    for seed in range(200):
        height, width = (12, 9) if seed % 2 else (7, 16)
        x = rng.normal(size=(height, width, 3)).astype(np.float32)
        torch.manual_seed(seed)
        want = RandomErasing(p)(torch.from_numpy(x).permute(2, 0, 1).clone()).permute(1, 2, 0).numpy()
        after_theirs = torch.rand(1).item()
        torch.manual_seed(seed)
        box = erase_box(height, width, TorchDraws(), p)
        assert torch.rand(1).item() == after_theirs, f"seed {seed}: another number of draws than torchvision"
        np.testing.assert_array_equal(erase(x, box), want, err_msg=f"seed {seed}")
        erased += box[2] * box[3] > 0
    assert erased > (60 if p < 1 else 150)


def test_augment_draws_after_the_crop_and_is_off_without_a_policy():
    """Augment.image draws from the example's generator only with a policy; its output is reproducible."""
    pixels = np.asarray(photo(32, 32))
    assert Augment(random_erase=0.3).image(pixels, None) is pixels
    a = Augment("ta_wide").image(pixels, np.random.default_rng(1))
    np.testing.assert_array_equal(a, Augment("ta_wide").image(pixels, np.random.default_rng(1)))
    outs = {Augment(p).image(pixels, np.random.default_rng(s)).tobytes() for p in ("ra", "svhn") for s in range(6)}
    assert len(outs) > 6
    box = Augment(random_erase=1.0).erase_box(32, 32, np.random.default_rng(0))
    assert box.dtype == np.int32 and box.shape == (4,) and box[2] * box[3] > 0


def test_the_loader_augments_each_example_in_order_resumably_and_erases_on_either_side():
    """Crop + flip, policy, erase box from the example's own generator; a resumed epoch has the same batches; the
    uint8 batches' boxes zeroed on the device give the host-normalised, host-erased batches."""
    import jax.numpy as jnp

    from train.mixing import erase_boxes
    from train.pipeline import ExampleLoader, example_rng, make_loader
    from train.steps import normalize_images
    from train.transforms import open_image, train_crop

    src = [{"image": np.asarray(photo(30, 40, seed=i)), "label": i % 2} for i in range(12)]
    aug = Augment("ta_wide", random_erase=0.7)
    common = {"batch_size": 4, "image_size": 16, "train": True, "seed": 5, "epoch": 1, "augment": aug}
    uint8 = list(make_loader(src, normalize=False, **common))
    assert all(set(b) == {"image", "label", "mask", "corrupt", "erase"} for b in uint8)
    rng = example_rng(5, 1, 3)
    pixels = aug.image(train_crop(open_image(src[3]["image"]), 16, rng), rng)
    example = ExampleLoader(src, 12, 16, True, 5, 1, normalize=False, augment=aug)(3)
    np.testing.assert_array_equal(example["image"], pixels)
    np.testing.assert_array_equal(example["erase"], aug.erase_box(16, 16, rng))
    for got, want in zip(make_loader(src, normalize=False, start_batch=1, **common), uint8[1:], strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    floats = list(make_loader(src, normalize=True, **common))
    assert all("erase" not in b for b in floats)
    for u, f in zip(uint8, floats):
        device = erase_boxes(normalize_images(jnp.asarray(u["image"]), jnp.asarray(u["mask"])), jnp.asarray(u["erase"]))
        # the device's normalisation vs the host's: 1e-6 at most, as tests/test_pipeline.py measures it
        np.testing.assert_allclose(np.asarray(device), f["image"], atol=1e-6, rtol=0)
        assert np.all(np.asarray(device)[f["image"] == 0] == 0)
    assert sum(int((b["erase"][:, 2] * b["erase"][:, 3] > 0).sum()) for b in uint8) >= 4
    assert set(next(make_loader(src, normalize=False, **{**common, "augment": Augment("ra")}))) == \
        {"image", "label", "mask", "corrupt"}
