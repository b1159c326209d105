"""Weights by name: the registry against torchvision's own enums, downloads and caches from a loopback server."""

from __future__ import annotations

import pytest

from resnet_flax import weights as W


def test_registry_matches_torchvision_enums():
    tvr = pytest.importorskip("torchvision.models.resnet")
    assert set(W.ENUM_NAMES.values()) == {n for n in dir(tvr) if n.endswith("_Weights")}
    for arch, enum_name in W.ENUM_NAMES.items():
        ref_enum, ours_enum = getattr(tvr, enum_name), W.REGISTRY[arch]
        assert list(ours_enum.__members__) == list(ref_enum.__members__), arch
        assert ours_enum.DEFAULT is ours_enum[ref_enum.DEFAULT.name]
        for ref in ref_enum:
            ours = ours_enum[ref.name]
            assert ours.url == ref.url and str(ours) == str(ref)
            meta, ref_meta = ours.meta, dict(ref.meta)
            assert " ".join(ref_meta.pop("_docs").split()) == meta.pop("_docs")
            assert meta == ref_meta, (arch, ref.name)  # categories, min_size, num_params, recipe, metrics, ops, size
            t, rt = ours.transforms, ref.transforms()
            assert ([t.crop_size], [t.resize_size], list(t.mean), list(t.std), t.interpolation, t.antialias) == (
                rt.crop_size, rt.resize_size, rt.mean, rt.std, rt.interpolation.value, rt.antialias)
            assert ref.url.split("/")[-1].split("-")[1].startswith(ours.value.hash_prefix)


@pytest.mark.parametrize("spec", ["IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2", "DEFAULT",
                                  W.ResNet50_Weights.IMAGENET1K_V2, W.ResNet50_Weights.DEFAULT])
def test_names_resolve_like_torchvision(spec):
    assert W.get_weights("resnet50", spec) is W.ResNet50_Weights.IMAGENET1K_V2.value


def test_bad_names_say_what_exists():
    assert W.get_weights("resnet50", True).name == "IMAGENET1K_V1"
    with pytest.raises(ValueError, match="IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        W.get_weights("resnet50", "IMAGENET1K_V3")
    with pytest.raises(ValueError, match="not resnet50"):
        W.get_weights("resnet50", W.ResNet18_Weights.DEFAULT)
    with pytest.raises(ValueError, match="not resnet50"):
        W.get_weights("resnet50", "ResNet18_Weights.IMAGENET1K_V1")
