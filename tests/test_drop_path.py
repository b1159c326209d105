"""Stochastic depth (``drop_path_rate``) against timm's ResNet: the per-block rates, the train-mode forward and
gradients with the same keep masks, the observed drop rate, and eval mode untouched."""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import nchw_to_nhwc, record_parity, rel_err, torch_model_with_bn_state
from flax import nnx
from test_parity import ACCURACY_SLACK, GRAD_GLOBAL_TOL, STATS_TOL, TRAIN_LOGITS_TOL, _torch_train_step

import convert
import resnet_flax
from resnet_flax.layers import DropPath
from resnet_flax.mapping import flax_to_torch


def _rates(model) -> list[float]:
    return [0.0 if blk.drop_path is None else blk.drop_path.rate for blk in model.blocks()]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet152", "resnext101_64x4d", "resnet26d",
                                  "resnet10t", "seresnext50_32x4d"])
def test_each_blocks_rate_is_timms(name):
    """The rate rises linearly with the block's index over the whole net, exactly as timm computes it."""
    with torch.device("meta"):
        import timm

        reference = timm.create_model(name, drop_path_rate=0.3)
    want = [0.0 if blk.drop_path is None else blk.drop_path.drop_prob
            for stage in (reference.layer1, reference.layer2, reference.layer3, reference.layer4) for blk in stage]
    model = nnx.eval_shape(lambda: resnet_flax.create_model(name, drop_path_rate=0.3))
    assert _rates(model) == want and want[0] == 0.0 and want[-1] == pytest.approx(0.3)
    model.set_drop_path_rate(0.0)
    assert _rates(model) == [0.0] * len(want) and model.drop_path_rate == 0.0


def _converted(name: str, rate: float) -> tuple[torch.nn.Module, resnet_flax.ResNet]:
    """timm's ``name`` with ``drop_path_rate`` (10 classes, random BatchNorm state) and our model of its weights."""
    tmodel = torch_model_with_bn_state(name, num_classes=10, drop_path_rate=rate)
    model = convert.build_model(convert.from_state_dict(tmodel.state_dict()))
    model.set_drop_path_rate(rate)
    return tmodel, model


def test_eval_mode_and_the_weights_are_unchanged():
    """Eval mode gives the model without stochastic depth bit for bit; no parameter or statistic is added, so
    files and checkpoints keep their layout; a train-mode call needs rngs; rate 0 draws nothing."""
    _, model = _converted("resnet10t", 0.5)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    model.eval()
    dropped, keys, tree = np.asarray(model(x)), resnet_flax.flat_state(model).keys(), jax.tree.structure(
        nnx.state(model))
    config = model.config
    model.set_drop_path_rate(0.0)
    np.testing.assert_array_equal(np.asarray(model(x)), dropped)
    assert (resnet_flax.flat_state(model).keys(), jax.tree.structure(nnx.state(model)), model.config) == (
        keys, tree, config)
    model.train()
    jaxpr = str(jax.make_jaxpr(lambda m, x: m(x))(model, x))
    assert "random" not in jaxpr and "threefry" not in jaxpr
    model.set_drop_path_rate(0.5)
    assert not model.blocks()[-1].drop_path.deterministic  # takes the model's mode
    with pytest.raises(ValueError, match="rngs"):
        model(x)


def _our_masks(model, key: jax.Array, batch: int) -> list[np.ndarray]:
    """The keep masks the model draws from ``nnx.Rngs(dropout=key)``: one per block with a drop path, in order."""
    rngs = nnx.Rngs(dropout=key)
    return [np.asarray(jax.random.bernoulli(rngs.dropout(), 1.0 - blk.drop_path.rate, (batch, 1, 1, 1)))
            for blk in model.blocks() if blk.drop_path is not None]


@pytest.mark.parametrize("name", ["resnet10t", "resnet14t"])  # BasicBlock and Bottleneck, one block per stage
def test_train_step_equals_timms_with_the_same_masks(name, monkeypatch, request):
    """timm's model with our keep masks in place of its bernoulli draws: logits, every gradient and the running
    statistics as test_parity judges a train step (float32 as close to timm's float64 as timm's own float32)."""
    rate, batch = 0.5, 8
    tmodel, model = _converted(name, rate)
    reference64 = copy.deepcopy(tmodel).double()
    model.train()
    key = jax.random.key(3)
    masks = _our_masks(model, key, batch)
    flat = np.concatenate([m.ravel() for m in masks])
    assert 0 < flat.sum() < flat.size  # some branches dropped, some kept

    draws: list[np.ndarray] = []

    def forced_bernoulli_(self, p):  # timm's drop_path: x.new_empty(shape).bernoulli_(keep_prob)
        mask = draws.pop(0)
        assert self.shape == (batch, 1, 1, 1) and p == pytest.approx(mask_rates.pop(0))
        return self.copy_(torch.from_numpy(mask.transpose(0, 3, 1, 2).astype(np.float64)))

    monkeypatch.setattr(torch.Tensor, "bernoulli_", forced_bernoulli_)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    results = []
    for reference in (tmodel, reference64):
        draws[:] = list(masks)
        mask_rates = [1.0 - blk.drop_path.rate for blk in model.blocks() if blk.drop_path is not None]
        results.append(_torch_train_step(reference, x if reference is tmodel else x.double(), y))
        assert not draws
    (l32, g32, s32), (l64, g64, s64) = results

    def loss_fn(m):
        logits = m(jnp.asarray(nchw_to_nhwc(x)), rngs=nnx.Rngs(dropout=key))
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(batch), jnp.asarray(y.numpy())]), logits

    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state):
        m = nnx.merge(graphdef, state)
        (_, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(m)
        return logits, grads, nnx.state(m)

    logits, grads, state = step(state)
    nnx.update(model, state)
    gj = flax_to_torch({".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)})
    sj = flax_to_torch(resnet_flax.flat_state(model))

    def worst(a, b, keys):
        return max(rel_err(a[k], b[k]) for k in keys)

    def global_err(a, b):
        return max(np.max(np.abs(a[k] - b[k])) for k in b) / max(np.max(np.abs(v)) for v in b.values())

    checks = {  # (ours vs timm float32, ours vs timm float64, timm float32 vs float64)
        "logits": (rel_err(logits, l32), rel_err(logits, l64), rel_err(l32, l64)),
        "grads (global)": (global_err(gj, g32), global_err(gj, g64), global_err(g32, g64)),
        "grads (worst tensor)": (worst(gj, g32, g32), worst(gj, g64, g64), worst(g32, g64, g64)),
        "running stats": (worst(sj, s32, s32), worst(sj, s64, s64), worst(s32, s64, s64)),
    }
    record_parity(request, "drop-path", f"{name:18s} drop path train: " + "; ".join(
        f"{k} {v[0]:.1e} (f64: ours {v[1]:.1e}, timm {v[2]:.1e})" for k, v in checks.items()))
    for k, (_, ours64, timm64) in checks.items():
        assert ours64 <= ACCURACY_SLACK * timm64 + 1e-6, (k, ours64, timm64)
    assert checks["logits"][0] <= TRAIN_LOGITS_TOL
    assert checks["grads (global)"][0] <= GRAD_GLOBAL_TOL
    assert checks["running stats"][0] <= STATS_TOL


def test_observed_drop_rate_and_scale():
    """Over many examples the dropped fraction is the rate (within 5 binomial standard deviations), the kept
    ones are scaled by 1 / keep as timm scales them (float32), and the same key draws the same mask."""
    rate, n = 0.3, 200_000
    layer = DropPath(rate)
    x = jnp.ones((n, 1, 1, 1), jnp.float32)
    out = np.asarray(layer(x, nnx.Rngs(dropout=jax.random.key(0)))).ravel()
    dropped = np.mean(out == 0)
    assert abs(dropped - rate) <= 5 * np.sqrt(rate * (1 - rate) / n)
    scale = (torch.ones(1).bernoulli_(1.0).div_(1 - rate) * torch.ones(1)).item()  # timm's arithmetic
    assert set(np.unique(out)) == {0.0, np.float32(scale)}
    again = np.asarray(layer(x, nnx.Rngs(dropout=jax.random.key(0)))).ravel()
    np.testing.assert_array_equal(again, out)
    layer.deterministic = True
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(x))


def test_train_step_draws_from_the_seed_and_the_step():
    """The step's masks come from (seed, step) alone, so a resumed run draws what the uninterrupted one drew:
    the step's loss is the model's with ``drop_path_key(seed, step)``, and changes with the step and the seed;
    with gradient accumulation each micro-batch draws its own masks."""
    from train.steps import OptimConfig, create_train_state, cross_entropy, drop_path_key, make_optimizer, train_step

    class Tiny(nnx.Module):  # a stem and one residual branch with a drop path, the ResNet's call signature
        def __init__(self, rngs: nnx.Rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.branch = nnx.Conv(4, 4, (3, 3), rngs=rngs)
            self.drop_path = DropPath(0.5)
            self.fc = nnx.Linear(4, 3, rngs=rngs)
            self.drop_path_rate = 0.5

        def __call__(self, x, mask=None, rngs=None):
            x = jax.nn.relu(self.conv(x))
            x = x + self.drop_path(self.branch(x), rngs)
            return self.fc(jnp.mean(x, axis=(1, 2)))

    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(8, 6, 6, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 3, 8), jnp.int32), "mask": jnp.ones(8, jnp.float32)}

    @functools.cache
    def compiled(seed: int, k: int):
        cfg = OptimConfig(total_steps=100, optimizer="sgd", label_smoothing=0.0, seed=seed, grad_accum_steps=k)
        tx = make_optimizer(cfg)
        graphdef, state = create_train_state(Tiny(nnx.Rngs(0)), tx)
        return jax.jit(lambda s, b: train_step(graphdef, cfg, s, b)), state

    def loss_at(step: int, seed: int = 0, k: int = 1) -> float:
        step_fn, state = compiled(seed, k)
        return float(step_fn(state.replace(step=jnp.asarray(step, jnp.int32)), batch)[1]["train_loss"])

    model = Tiny(nnx.Rngs(0))
    model.train()
    logits = model(batch["image"], rngs=nnx.Rngs(dropout=drop_path_key(0, 5)))
    want = float(jnp.mean(cross_entropy(logits, batch["label"], 3)))
    assert loss_at(5) == pytest.approx(want, rel=1e-6) and loss_at(5) == loss_at(5)
    assert len({loss_at(5), loss_at(6), loss_at(5, seed=1)}) == 3
    accumulated = loss_at(5, k=2)
    assert np.isfinite(accumulated) and accumulated != loss_at(5)


def test_the_flag_reaches_the_model(capsys):
    """``--drop-path-rate`` gives the run's model timm's rates (fresh, from weights or resumed alike); a rate
    outside [0, 1) is one line and exit 2."""
    from train.config import parse_config
    from train.model_setup import initial_model

    cfg = parse_config(["--arch", "resnet18", "--drop-path-rate", "0.1"])
    model = nnx.eval_shape(lambda: initial_model(cfg, 10))
    assert _rates(model) == [0.1 * i / 7 for i in range(8)]
    for bad in ("1", "-0.1"):
        with pytest.raises(SystemExit) as stop:
            parse_config(["--drop-path-rate", bad])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1 and "--drop-path-rate" in err
