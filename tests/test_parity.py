"""The point of the project: converted weights give torchvision's numbers to float32 precision."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import ONE_BLOCK_PER_STAGE, nchw_to_nhwc, record_parity, rel_err, torch_model_with_bn_state, torch_stages
from flax import nnx

import convert
import resnet_flax
from resnet_flax.mapping import flax_to_torch
from resnet_flax.registry import list_models

ALL_ARCHS = resnet_flax.list_models()  # torchvision's, then timm's (the reference model is timm's for those)
EVAL_TOL = 1e-5
# The slow tier: the architectures that only add depth or width to one the fast tier runs.
DEEP = {"resnet101", "resnet152", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
        "resnet101d", "resnet152d", "resnet50", "resnext50_32x4d", "seresnext50_32x4d"}


def tiered(names: list[str]) -> list:
    """``names`` as parameters, those in DEEP marked slow."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n for n in names]


def _eval_input(name: str) -> torch.Tensor:
    """64x64; 64x48 for timm's, so the ceil-mode avg-pool shortcut meets an odd width (3, at layer4)."""
    width = 48 if name in list_models("timm") else 64
    return torch.randn(2, 3, 64, width, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", tiered(ALL_ARCHS))
def test_eval_parity(name, request):
    tmodel = torch_model_with_bn_state(name)
    model = convert.build_model(convert.from_state_dict(tmodel.state_dict()))
    assert model.config == resnet_flax.arch_config(name)
    x = _eval_input(name)
    with torch.no_grad():
        ref_stages, ref_logits = torch_stages(tmodel, x)
    xj = jnp.asarray(nchw_to_nhwc(x))
    logits = model(xj)
    stages = model.stages(xj)
    errs = {k: rel_err(stages[k], nchw_to_nhwc(ref_stages[k])) for k in ref_stages}
    errs["logits"] = rel_err(logits, ref_logits)
    worst_stage = max(errs[k] for k in ref_stages)
    record_parity(request, "parity-eval", f"{name:18s} logits {errs['logits']:.2e}  worst stage {worst_stage:.2e}",
                  arch=name, logits=errs["logits"], worst_stage=worst_stage)
    assert max(errs.values()) <= EVAL_TOL, errs
    assert np.array_equal(np.argmax(logits, -1), ref_logits.argmax(-1).numpy())


# Train mode: forward with batch statistics, gradients of every parameter, updated running stats.
# Float32 is judged against a float64 run of the same PyTorch model: Flax's float32 error must be no
# larger than PyTorch's own float32 error (x ACCURACY_SLACK, plus a 1e-6 floor). In grouped Bottleneck nets
# some gradient tensors are nearly zero after BatchNorm's backward cancels, and there PyTorch's own
# float32 gradients are up to 4% off float64, so a fixed per-tensor bound against PyTorch would test noise.
# The fixed bounds against PyTorch float32 come on top: logits and running statistics to 1e-4; the global
# gradient error (max |diff| over all gradients / max |grad|) to 3x the largest global error of PyTorch's own
# float32 against float64 among these models (4.1e-3, resnext50_32x4d with one block per stage; resnet18:
# 4.6e-6), which float32 could put between two correct implementations; any real bug is O(1).
ACCURACY_SLACK = 3.0
TRAIN_LOGITS_TOL = 1e-4
GRAD_GLOBAL_TOL = 1.2e-2
STATS_TOL = 1e-4


def _torch_train_step(tmodel, x, y):
    tmodel.train()
    tmodel.zero_grad()
    logits = tmodel(x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    grads = {k: p.grad.double().numpy() for k, p in tmodel.named_parameters()}
    stats = {k: v.double().numpy() for k, v in tmodel.state_dict().items() if "running" in k}
    return logits.detach().double().numpy(), grads, stats


# torchvision's BasicBlock (resnet18) and Bottleneck, plain and grouped (resnet50 and resnext50_32x4d with one block
# per stage: the same modules at a quarter of the blocks); timm's resnet18d (deep stem and avg-pool shortcuts in
# BasicBlocks), resnet14t (tiered stem, Bottleneck with the identity pool in layer1's shortcut) and seresnext50_32x4d
# with one block per stage (SE gates with grouped convs) put every module through train mode (stem BatchNorms'
# statistics, the pool's and the gate's gradients); more blocks add only depth, which the eval test covers.
@pytest.mark.parametrize("name", tiered(["resnet18", "resnet18d", "resnet14t", *ONE_BLOCK_PER_STAGE]))
def test_train_step_parity(name, request):
    tmodel = torch_model_with_bn_state(name, num_classes=10)
    model = convert.build_model(convert.from_state_dict(tmodel.state_dict()))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 64, 64, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    l32, g32, s32 = _torch_train_step(tmodel, x, y)
    l64, g64, s64 = _torch_train_step(torch_model_with_bn_state(name, num_classes=10).double(), x.double(), y)

    model.train()

    def loss_fn(m):
        logits = m(jnp.asarray(nchw_to_nhwc(x)))
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), jnp.asarray(y.numpy())]), logits

    # Compiled, as training runs it (op by op, the step is thousands of small programs: 5x slower on a busy CI).
    (_, logits), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
    gj = flax_to_torch({".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)})
    sj = flax_to_torch(resnet_flax.flat_state(model))
    assert set(gj) == set(g32)

    def worst(a, b, keys):
        return max(rel_err(a[k], b[k]) for k in keys)

    def global_err(a, b):
        return max(np.max(np.abs(a[k] - b[k])) for k in b) / max(np.max(np.abs(v)) for v in b.values())

    checks = {  # (flax vs torch32, flax vs float64, torch32 vs float64)
        "logits": (rel_err(logits, l32), rel_err(logits, l64), rel_err(l32, l64)),
        "grads (global)": (global_err(gj, g32), global_err(gj, g64), global_err(g32, g64)),
        "grads (worst tensor)": (worst(gj, g32, g32), worst(gj, g64, g64), worst(g32, g64, g64)),
        "running stats": (worst(sj, s32, s32), worst(sj, s64, s64), worst(s32, s64, s64)),
    }
    record_parity(request, "parity-train", f"{name:18s} train: " + "; ".join(
        f"{k} {v[0]:.1e} (f64: flax {v[1]:.1e}, torch {v[2]:.1e})" for k, v in checks.items()),
        arch=name, **{k: {"vs_torch": v[0], "flax_vs_f64": v[1], "torch_vs_f64": v[2]} for k, v in checks.items()})
    for k, (_, flax64, torch64) in checks.items():
        assert flax64 <= ACCURACY_SLACK * torch64 + 1e-6, (k, flax64, torch64)
    assert checks["logits"][0] <= TRAIN_LOGITS_TOL
    assert checks["grads (global)"][0] <= GRAD_GLOBAL_TOL
    assert checks["running stats"][0] <= STATS_TOL
    tracked = [int(v) for k, v in sj.items() if k.endswith("num_batches_tracked")]
    assert tracked == [8] * len(tracked)  # 7 in the checkpoint + this step


def test_converted_model_does_not_alias_torch_buffers():
    """Running the PyTorch model in train mode afterwards must not change the converted model."""
    tmodel = torch_model_with_bn_state("resnet18")
    model = convert.build_model(convert.from_state_dict(tmodel.state_dict()))
    before = np.array(model.bn1.mean[...])
    tmodel.train()
    with torch.no_grad():
        tmodel(torch.randn(2, 3, 64, 64))
    assert not np.allclose(tmodel.bn1.running_mean.numpy(), before)
    np.testing.assert_array_equal(np.asarray(model.bn1.mean[...]), before)


@pytest.mark.slow
def test_trained_checkpoint_through_cli(tmp_path):
    """A model trained a few steps in PyTorch, saved, converted by the CLI: same predictions."""
    torch.manual_seed(0)
    import torchvision

    tmodel = torchvision.models.resnet18(num_classes=5)
    opt = torch.optim.SGD(tmodel.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(16, 3, 64, 64, generator=g)
    ys = torch.randint(0, 5, (16,), generator=g)
    losses = []
    tmodel.train()
    for step in range(4):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(tmodel(xs[step % 2 * 8:][:8]), ys[step % 2 * 8:][:8])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    tmodel.eval()
    path = tmp_path / "trained.pth"
    torch.save({"epoch": 4, "state_dict": tmodel.state_dict()}, path)

    proc = subprocess.run([sys.executable, "-m", "convert", str(path), "--arch", "resnet18", "--verify",
                           "--verify-size", "64"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "resnet18" in proc.stdout and "OK" in proc.stdout
    out = tmp_path / "trained.flax.safetensors"
    model = resnet_flax.load(out)

    x = torch.randn(8, 3, 64, 64, generator=g)
    with torch.no_grad():
        ref = tmodel(x).numpy()
    logits = np.asarray(model(jnp.asarray(nchw_to_nhwc(x))))
    assert rel_err(logits, ref) <= EVAL_TOL
    assert np.array_equal(logits.argmax(-1), ref.argmax(-1))
