"""The checkpoints people hold, each against its own library's forward pass at 1e-5 (float32; see
parity-and-anchors: float32 vs float64 differs by <= 3e-6 on these nets): timm training checkpoints with EMA
weights, Hugging Face transformers ResNets, headless backbones, torchvision segmentation models, hub names."""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import randomize_bn_state, record_parity, rel_err
from flax import nnx

import convert
import resnet_flax
from convert.__main__ import main as convert_main
from resnet_flax.errors import WeightsError
from resnet_flax.hub import file_info

TOL = 1e-5


def rand_x(size: int = 32, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, size, size), np.float32)


def ours(model, x: np.ndarray) -> np.ndarray:
    return ours_and_layer4(model, x)[0]


@nnx.jit
def _forward(model, x):
    return model(x), model.stages(x)["layer4"]


def ours_and_layer4(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Our model's output and its layer4 features (NHWC), in one compiled call at full float32 precision."""
    with jax.default_matmul_precision("highest"):
        out, layer4 = _forward(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
    return np.asarray(out), np.asarray(layer4)


def theirs(model, x: np.ndarray):
    with torch.no_grad():
        return model(torch.from_numpy(x))


def row(request, source: str, err: float) -> None:
    record_parity(request, "formats", f"{source:<58s} max rel diff {err:.2e}")


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what building the source models printed
    code = convert_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- timm ---------------------------------------------------------------------------------------------------

def _timm_model(seed: int, **kwargs):
    import timm
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", **kwargs)
    randomize_bn_state(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def test_timm_training_checkpoint_prefers_ema_like_timm(request, tmp_path, capsys):
    from timm.models import load_checkpoint

    model, ema = _timm_model(0, num_classes=5), _timm_model(1, num_classes=5)
    args = argparse.Namespace(model="resnet18", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], input_size=[3, 64, 64],
                              crop_pct=0.9, interpolation="bicubic", class_names=None)
    torch.save({"arch": "resnet18", "args": args, "epoch": 3, "metric": 71.5, "version": 2,
                "state_dict": model.state_dict(), "state_dict_ema": ema.state_dict(),
                "class_names": ["a", "b", "c", "d", "e"]}, tmp_path / "model_best.pth.tar")
    x = rand_x()
    ref = _timm_model(2, num_classes=5)
    load_checkpoint(ref, str(tmp_path / "model_best.pth.tar"))  # timm's own loader: use_ema=True
    code, out, err = cli(capsys, tmp_path / "model_best.pth.tar")
    assert code == 0, err
    assert "EMA weights ('state_dict_ema')" in out and "--weights-set model" in out
    converted = tmp_path / "model_best.flax.safetensors"
    err_ema = rel_err(ours(resnet_flax.load(converted), x), theirs(ref, x))
    assert err_ema < TOL
    row(request, "timm training checkpoint, state_dict_ema (timm's loader)", err_ema)
    info = file_info(converted)
    assert info.weights_set == "ema" and info.class_names == ["a", "b", "c", "d", "e"]
    assert (info.transform.crop_size, info.transform.resize_size, info.transform.mean) == (64, 71, (0.5, 0.5, 0.5))
    assert info.sha256 and info.source.endswith("model_best.pth.tar")

    code, out, err = cli(capsys, tmp_path / "model_best.pth.tar", "--weights-set", "model", "--out",
                         tmp_path / "raw.flax.safetensors")
    assert code == 0 and "model weights ('state_dict')" in out
    assert rel_err(ours(resnet_flax.load(tmp_path / "raw.flax.safetensors"), x), theirs(model, x)) < TOL

    torch.save(model.state_dict(), tmp_path / "plain.pth")
    code, out, err = cli(capsys, tmp_path / "plain.pth", "--weights-set", "ema")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "holds no EMA weights" in err


def test_timm_headless_backbone(request, tmp_path, capsys):
    model = _timm_model(0, num_classes=0)
    torch.save(model.state_dict(), tmp_path / "headless.pth")
    code, out, err = cli(capsys, tmp_path / "headless.pth")
    assert code == 0, err
    assert "headless" in out and "0 classes" in out
    ours_model = resnet_flax.load(tmp_path / "headless.flax.safetensors")
    assert ours_model.config.num_classes == 0 and ours_model.fc is None
    x = rand_x()
    feats, layer4 = ours_and_layer4(ours_model, x)
    err_feats = rel_err(feats, theirs(model, x))  # timm num_classes=0: pooled features
    with torch.no_grad():
        ref4 = model.forward_features(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    assert err_feats < TOL and rel_err(layer4, ref4) < TOL
    row(request, "timm resnet18 num_classes=0 (pooled features)", err_feats)


# --- torchvision segmentation -----------------------------------------------------------------------------

def test_torchvision_segmentation_backbone(request, tmp_path, capsys):
    from torchvision.models.segmentation import fcn_resnet50

    torch.manual_seed(0)
    seg = fcn_resnet50(weights=None, weights_backbone=None, num_classes=3, aux_loss=True)
    randomize_bn_state(seg, torch.Generator().manual_seed(1))
    seg.eval()
    torch.save(seg.state_dict(), tmp_path / "fcn.pth")
    code, out, err = cli(capsys, tmp_path / "fcn.pth")
    assert code == 0, err
    assert "left out" in out and "classifier." in out and "aux_classifier." in out and "0,1,1" in out
    model = resnet_flax.load(tmp_path / "fcn.flax.safetensors")
    assert model.config.replace_stride_with_dilation == (False, True, True)
    x = rand_x(48, 1)
    out4 = ours_and_layer4(model, x)[1]
    ref4 = theirs(seg.backbone, x)["out"].numpy().transpose(0, 2, 3, 1)
    err4 = rel_err(out4, ref4)
    assert err4 < TOL
    row(request, "torchvision fcn_resnet50 backbone (layer4, dilated)", err4)


# --- Hugging Face transformers ----------------------------------------------------------------------------

def _hf_model(folder, *, headless: bool = False, **config_kwargs):
    import transformers
    config = transformers.ResNetConfig(layer_type="basic", depths=[1, 2, 1, 1], hidden_sizes=[64, 128, 256, 512],
                                       num_labels=4, id2label={i: f"label {i}" for i in range(4)},
                                       label2id={f"label {i}": i for i in range(4)}, **config_kwargs)
    torch.manual_seed(0)
    cls = transformers.ResNetModel if headless else transformers.ResNetForImageClassification
    model = cls(config)
    randomize_bn_state(model, torch.Generator().manual_seed(1))
    model.eval()
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"crop_pct": 0.875, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3,
         "size": {"shortest_edge": 224}, "image_processor_type": "ConvNextImageProcessor"}))
    return model


def test_transformers_resnet_folder(request, tmp_path, capsys):
    hf = _hf_model(tmp_path / "hf")
    code, out, err = cli(capsys, tmp_path / "hf", "--out", tmp_path / "hf.flax.safetensors")
    assert code == 0, err
    assert "Hugging Face transformers" in out
    x = rand_x()
    err_hf = rel_err(ours(resnet_flax.load(tmp_path / "hf.flax.safetensors"), x), theirs(hf, x).logits)
    assert err_hf < TOL
    row(request, "transformers ResNetForImageClassification (save_pretrained)", err_hf)
    info = file_info(tmp_path / "hf.flax.safetensors")
    assert info.class_names == [f"label {i}" for i in range(4)]
    assert (info.transform.crop_size, info.transform.resize_size, info.transform.interpolation) == (224, 256,
                                                                                                    "bicubic")

    base = _hf_model(tmp_path / "base", headless=True)  # ResNetModel: no "resnet." prefix, no classifier
    model = convert.load_model(tmp_path / "base" / "model.safetensors")
    assert model.config.num_classes == 0
    ref = theirs(base, x).pooler_output.numpy().reshape(2, -1)
    assert rel_err(ours(model, x), ref) < TOL


def test_transformers_settings_the_weights_cannot_show_are_refused(tmp_path, capsys):
    _hf_model(tmp_path / "v1", downsample_in_bottleneck=True)
    _hf_model(tmp_path / "noconf")
    (tmp_path / "noconf" / "config.json").unlink()
    for folder, expect in (("v1", "downsample_in_bottleneck=True"), ("noconf", "without its config.json")):
        code, _, err = cli(capsys, tmp_path / folder / "model.safetensors", "--out", tmp_path / f"{folder}.out")
        assert code == 2 and len(err.strip().splitlines()) == 1 and expect in err, err
        assert not (tmp_path / f"{folder}.out").exists()


# --- hub names through huggingface_hub, offline from a pre-populated cache ---------------------------------

def _fake_hf_cache(cache, repo_id: str, files: dict[str, bytes]) -> None:
    """huggingface_hub's cache layout: refs/main names a snapshot folder holding the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def test_hub_names_offline_from_the_hf_cache(request, tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc
    from safetensors.torch import save_file

    cache = tmp_path / "hf"
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("RESNET_FLAX_HOME", str(tmp_path / "home"))

    timm_model = _timm_model(0, num_classes=3)
    save_file(timm_model.state_dict(), tmp_path / "t.safetensors")
    timm_cfg = {"architecture": "resnet18", "num_classes": 3, "label_names": ["x", "y", "z"],
                "pretrained_cfg": {"input_size": [3, 224, 224], "crop_pct": 0.95, "interpolation": "bicubic",
                                   "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
    _fake_hf_cache(cache, "timm/resnet18.test", {"config.json": json.dumps(timm_cfg).encode(),
                                                 "model.safetensors": (tmp_path / "t.safetensors").read_bytes()})
    hf = _hf_model(tmp_path / "msft")
    _fake_hf_cache(cache, "microsoft/resnet-test", {n: (tmp_path / "msft" / n).read_bytes() for n in (
        "config.json", "model.safetensors", "preprocessor_config.json")})

    x = rand_x()
    model = resnet_flax.resnet18(weights="hf-hub:timm/resnet18.test")
    assert rel_err(ours(model, x), theirs(timm_model, x)) < TOL
    assert rel_err(ours(resnet_flax.create_model("hf-hub:timm/resnet18.test"), x), theirs(timm_model, x)) < TOL
    model = resnet_flax.create_model(None, weights="microsoft/resnet-test")
    assert rel_err(ours(model, x), theirs(hf, x).logits) < TOL
    converted = sorted((tmp_path / "home" / "converted").iterdir())
    assert [p.name for p in converted] == ["hf--microsoft--resnet-test--0123456789ab.flax.safetensors",
                                           "hf--timm--resnet18.test--0123456789ab.flax.safetensors"]
    info = file_info(converted[1])
    assert info.source == "hf-hub:timm/resnet18.test" and info.class_names == ["x", "y", "z"]
    assert (info.transform.resize_size, info.transform.interpolation) == (235, "bicubic")  # floor(224 / 0.95)
    with pytest.raises(WeightsError, match="not in the Hugging Face cache") as e:
        resnet_flax.resnet18(weights="hf-hub:timm/resnet18.absent")
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(WeightsError, match="contradicts"):
        resnet_flax.resnet50(weights="hf-hub:timm/resnet18.test")


def test_timm_variant_by_hub_name(request, tmp_path, monkeypatch):
    """timm's ResNet-D weights arrive by hub name like plain ones (resnet18d: deep stem, avg-pool shortcuts)."""
    import huggingface_hub.constants as hfc
    import timm
    from safetensors.torch import save_file
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("RESNET_FLAX_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    ref = timm.create_model("resnet18d", num_classes=3)
    randomize_bn_state(ref, torch.Generator().manual_seed(1))
    ref.eval()
    save_file(ref.state_dict(), tmp_path / "d.safetensors")
    _fake_hf_cache(tmp_path / "hf", "timm/resnet18d.test", {
        "config.json": json.dumps({"architecture": "resnet18d", "num_classes": 3}).encode(),
        "model.safetensors": (tmp_path / "d.safetensors").read_bytes()})
    x = rand_x()
    err = rel_err(ours(resnet_flax.resnet18d(weights="hf-hub:timm/resnet18d.test"), x), theirs(ref, x))
    assert err < TOL
    row(request, "hf-hub:timm/resnet18d (offline HF cache)", err)
    with pytest.raises(ValueError, match=r"hf-hub:timm/resnet18d\.<tag>"):
        resnet_flax.resnet18d(weights="DEFAULT")
