"""Weights by name: the registry against torchvision's own enums, downloads and caches from a loopback server."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

import resnet_flax
from resnet_flax import hub
from resnet_flax import weights as W
from resnet_flax.errors import WeightsError

REPO = Path(__file__).resolve().parents[1]


def test_registry_matches_torchvision_enums():
    import torchvision.models.resnet as tvr
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


# --- download, verify, convert, cache: a loopback server stands in for download.pytorch.org ----------------

class _Server:
    """A static file server on 127.0.0.1 that counts requests."""

    def __init__(self, root: Path):
        handler = functools.partial(_Handler, directory=str(root), server_owner=self)
        self.requests: list[str] = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, server_owner, **kwargs):
        self.owner = server_owner
        super().__init__(*args, **kwargs)

    def do_GET(self):
        self.owner.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


CLOSED_URL = "http://127.0.0.1:9/"  # the discard port: nothing listens, the connection is refused


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Fresh resnet_flax and torch caches under tmp_path, loopback never proxied."""
    monkeypatch.setenv("RESNET_FLAX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return tmp_path


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    """A resnet18 checkpoint with random BN state, named like torchvision's (``resnet18-<sha256 prefix>.pth``)."""
    import torch
    from conftest import torch_model_with_bn_state

    folder = tmp_path_factory.mktemp("served")
    model = torch_model_with_bn_state("resnet18")
    tmp = folder / "tmp.pth"
    torch.save(model.state_dict(), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = folder / f"resnet18-{digest[:8]}.pth"
    tmp.rename(path)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    return path, digest, x, ref


def fake_weights(base_url: str, filename: str) -> W.Weights:
    return dataclasses.replace(W.ResNet18_Weights.IMAGENET1K_V1.value, url=base_url + filename)


def patch_registry(monkeypatch, w: W.Weights) -> None:
    monkeypatch.setattr(hub, "get_weights", lambda arch, spec: w)


def logits(model, x) -> np.ndarray:
    with jax.default_matmul_precision("highest"):
        return np.asarray(model(jnp.asarray(x.transpose(0, 2, 3, 1))))


def test_download_verify_convert_then_offline(env, r18_file, monkeypatch):
    path, digest, x, ref = r18_file
    server = _Server(path.parent)
    patch_registry(monkeypatch, fake_weights(server.url, path.name))
    try:
        model = resnet_flax.resnet18(weights="IMAGENET1K_V1", progress=False)
    finally:
        server.close()
    assert server.requests == [f"/{path.name}"]
    assert rel_err(logits(model, x), ref) < 1e-5
    converted = env / "home" / "converted" / path.name.replace(".pth", ".flax.safetensors")
    info = hub.file_info(converted)
    assert info.class_names == list(W.imagenet_categories()) and info.transform == W.EvalTransform(224, 256)
    assert (info.source, info.sha256, info.weights) == (server.url + path.name, digest,
                                                        "ResNet18_Weights.IMAGENET1K_V1")
    assert sorted(p.name for p in (env / "home").rglob("*") if p.is_file()) == [converted.name]  # download gone
    again = resnet_flax.create_model("resnet18", pretrained=True)  # server closed: the converted file serves
    np.testing.assert_array_equal(logits(again, x), logits(model, x))
    with pytest.raises(ValueError, match="num_classes=10 does not fit the weights, which have 1000"):
        resnet_flax.resnet18(weights="DEFAULT", num_classes=10)


def test_torch_hub_cache_is_reused(env, r18_file, monkeypatch):
    path, _, x, ref = r18_file
    hub_dir = env / "torch" / "hub" / "checkpoints"
    hub_dir.mkdir(parents=True)
    shutil.copy(path, hub_dir / path.name)
    patch_registry(monkeypatch, fake_weights(CLOSED_URL, path.name))
    model = resnet_flax.resnet18(weights="DEFAULT", progress=False)
    assert rel_err(logits(model, x), ref) < 1e-5
    assert (hub_dir / path.name).is_file()  # torch's file is left alone


def test_hash_mismatch_and_offline_refused_in_one_line(env, r18_file, monkeypatch):
    path, _, _, _ = r18_file
    served = env / "served"
    served.mkdir()
    bad_name = "resnet18-00000000.pth"
    shutil.copy(path, served / bad_name)
    server = _Server(served)
    patch_registry(monkeypatch, fake_weights(server.url, bad_name))
    try:
        with pytest.raises(WeightsError, match="does not start with '00000000'") as e:
            resnet_flax.resnet18(weights="DEFAULT", progress=False)
    finally:
        server.close()
    assert len(str(e.value).splitlines()) == 1
    assert not [p for p in (env / "home").rglob("*") if p.is_file()]  # no partial download, no converted file
    patch_registry(monkeypatch, fake_weights(CLOSED_URL, path.name))
    with pytest.raises(WeightsError) as e:
        resnet_flax.resnet18(weights="DEFAULT")
    msg = str(e.value)
    converted = env / "home" / "converted" / path.name.replace(".pth", ".flax.safetensors")
    assert len(msg.splitlines()) == 1 and CLOSED_URL + path.name in msg and str(converted) in msg
    assert f"python -m convert {path.name} --out {converted}" in msg


WITHOUT_TORCH = """
import dataclasses, sys
sys.modules['torch'] = None; sys.modules['torchvision'] = None
import numpy as np, jax, jax.numpy as jnp
import resnet_flax
from resnet_flax import hub, weights as W
w = dataclasses.replace(W.ResNet18_Weights.IMAGENET1K_V1.value, url=sys.argv[1])
hub.get_weights = lambda arch, spec: w
x = jnp.asarray(np.load(sys.argv[2]))
with jax.default_matmul_precision("highest"):
    first = np.asarray(resnet_flax.resnet18(weights="IMAGENET1K_V1", progress=False)(x))
    second = np.asarray(resnet_flax.resnet50.__globals__['create_model']('resnet18', weights='DEFAULT')(x))
np.save(sys.argv[3], np.stack([first, second]))
"""


def test_weights_by_name_without_torch(env, r18_file):
    path, _, x, ref = r18_file
    np.save(env / "x.npy", x.transpose(0, 2, 3, 1))
    server = _Server(path.parent)
    try:
        proc = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, server.url + path.name, str(env / "x.npy"),
                               str(env / "out.npy")], capture_output=True, text=True, cwd=REPO, env=os.environ)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert server.requests == [f"/{path.name}"]  # the second call needed no network
    first, second = np.load(env / "out.npy")
    assert rel_err(first, ref) < 1e-5 and np.array_equal(first, second)


# --- metadata travels into train.predict -------------------------------------------------------------------

def test_predict_uses_what_the_file_records(tmp_path):
    from PIL import Image

    from resnet_flax.io import abstract_model, load_flat_state
    from resnet_flax.loading import variable_shapes
    from train.predict import load_predictor
    from train.transforms import eval_transform

    config = resnet_flax.arch_config("resnet18", num_classes=3)
    zeros = {k: np.zeros(shape, np.float32) for k, shape in variable_shapes(config).items()}  # no slow random init
    model = load_flat_state(abstract_model(config), zeros)
    t = W.EvalTransform(crop_size=40, resize_size=48, interpolation="bicubic", mean=(0.5, 0.5, 0.5),
                        std=(0.25, 0.25, 0.25))
    info = W.WeightsInfo(class_names=["cat", "dog", "fox"], transform=t, source="test")
    resnet_flax.save(model, tmp_path / "m.flax.safetensors", extra_metadata=info.to_metadata())
    _, names, got = load_predictor(tmp_path / "m.flax.safetensors")
    assert names == ["cat", "dog", "fox"] and got == t
    names, got = W.WeightsInfo().eval_settings(1000)  # nothing recorded: ImageNet's names, 256/224
    assert names[:2] == ["tench", "goldfish"] and got == W.EvalTransform(224, 256)

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    img.save(tmp_path / "a.png")
    x = eval_transform(img, 40, 48, interpolation="bicubic", mean=t.mean, std=t.std)
    ref = (np.asarray(img.resize((64, 48), Image.BICUBIC))[4:44, 12:52] / np.float32(255) - 0.5) / 0.25
    np.testing.assert_allclose(x, ref, atol=1e-6)
