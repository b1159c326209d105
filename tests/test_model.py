"""The models themselves: structure, initialisation, options, dtypes and BatchNorm semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torchvision
from flax import nnx

import resnet_flax
from resnet_flax.io import abstract_model
from resnet_flax.layers import BatchNorm
from resnet_flax.model import AvgPoolShortcut, ResNetConfig, se_channels
from resnet_flax.registry import list_models


def n_params(model) -> int:
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", resnet_flax.list_models())
def test_parameter_count_matches_torchvision_and_timm(name):
    with torch.device("meta"):
        ref = timm.create_model(name) if name in list_models("timm") else getattr(torchvision.models, name)()
    expected = sum(p.numel() for p in ref.parameters())
    assert n_params(abstract_model(resnet_flax.arch_config(name))) == expected


def test_factories_and_registry():
    assert resnet_flax.list_models() == [
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
        "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2", *list_models("timm")]
    assert list_models("timm") == ["resnet18d", "resnet26d", "resnet34d", "resnet50d", "resnet101d", "resnet152d",
                                     "resnet10t", "resnet14t", "seresnet50", "seresnext50_32x4d"]
    for name in resnet_flax.list_models():
        assert getattr(resnet_flax, name).__name__ == name and name in getattr(resnet_flax, name).__doc__
        assert resnet_flax.arch_name(resnet_flax.arch_config(name, num_classes=3)) == name
    m = resnet_flax.resnet18(num_classes=3)
    assert m.config == resnet_flax.arch_config("resnet18", num_classes=3)
    with pytest.raises(ValueError, match=r"unknown architecture 'resnet19'.*resnet18"):
        resnet_flax.create_model("resnet19")
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1"):
        resnet_flax.ResNet(resnet_flax.ResNetConfig("basic", (1, 1, 1, 1), groups=2), rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="Dilation > 1"):
        resnet_flax.create_model("resnet18", replace_stride_with_dilation=(False, False, True))


def test_initialisation_follows_torchvision():
    m = resnet_flax.resnet50(num_classes=1000, seed=1)
    k = np.asarray(m.layer3[0].conv2.kernel[...])  # (3, 3, 256, 256): fan_out = 3*3*256
    assert abs(k.std() - np.sqrt(2.0 / (9 * 256))) / np.sqrt(2.0 / (9 * 256)) < 0.01
    assert abs(k.mean()) < 1e-3
    assert np.abs(k).max() > 3.5 * k.std()  # not a truncated normal
    w, b = np.asarray(m.fc.kernel[...]), np.asarray(m.fc.bias[...])
    bound = 1 / np.sqrt(2048)
    for t in (w, b):
        assert t.min() >= -bound and t.max() <= bound and t.max() > 0.9 * bound
    np.testing.assert_array_equal(np.asarray(m.bn1.scale[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(m.bn1.bias[...]), 0.0)
    assert np.asarray(m.layer1[0].bn3.scale[...]).min() == 1.0


def test_zero_init_residual():
    m = resnet_flax.resnet50(zero_init_residual=True)
    assert all(np.all(np.asarray(b.bn3.scale[...]) == 0) for b in m.layer2)
    assert np.all(np.asarray(m.layer2[0].bn2.scale[...]) == 1)
    b = resnet_flax.resnet18(zero_init_residual=True)
    assert np.all(np.asarray(b.layer4[1].bn2.scale[...]) == 0)


def test_outputs_and_dilation():
    x = jnp.ones((2, 64, 64, 3))
    m = resnet_flax.resnet50(num_classes=5, replace_stride_with_dilation=(False, True, True))
    stages = m.stages(x)
    assert {k: v.shape for k, v in stages.items()} == {
        "layer1": (2, 16, 16, 256), "layer2": (2, 8, 8, 512), "layer3": (2, 8, 8, 1024), "layer4": (2, 8, 8, 2048)}
    assert m(x).shape == (2, 5) and m(x).dtype == jnp.float32
    e = m.embed(x, normalize=True)
    assert e.shape == (2, 2048)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(e), axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(m.fc(m.embed(x))), np.asarray(m(x)), rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
    m32 = resnet_flax.resnet18(num_classes=10, seed=0)
    m16 = resnet_flax.resnet18(num_classes=10, seed=0, dtype=jnp.bfloat16)
    assert {v.dtype for _, v in nnx.to_flat_state(nnx.state(m16, nnx.Param))} == {jnp.dtype(jnp.float32)}
    m32.eval(), m16.eval()
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    assert m16.stages(x)["layer2"].dtype == jnp.bfloat16
    a, b = np.asarray(m32(x)), np.asarray(m16(x))
    assert b.dtype == np.float32
    assert np.max(np.abs(a - b)) / np.max(np.abs(a)) < 0.05  # bf16 has an 8-bit mantissa


@pytest.mark.parametrize("shape", [(8, 5, 5, 3), (2, 1, 1, 4)])
def test_batchnorm_matches_torch(shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)
    c = shape[-1]
    tb = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        tb.weight.uniform_(0.5, 1.5)
        tb.bias.normal_()
    fb = BatchNorm(c)
    fb.scale[...] = jnp.asarray(tb.weight.detach().numpy())
    fb.bias[...] = jnp.asarray(tb.bias.detach().numpy())
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    for _ in range(3):  # train mode: output, running mean and *unbiased* running var, counter
        ref = tb.train()(xt).detach().numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(fb(jnp.asarray(x))), ref, rtol=1e-5, atol=2e-5)
        x = x * 1.1 + 0.3
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(np.asarray(fb.mean[...]), tb.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(fb.var[...]), tb.running_var.numpy(), rtol=1e-6)
    assert int(fb.num_batches_tracked[...]) == int(tb.num_batches_tracked) == 3
    fb.eval()
    ref = tb.eval()(xt).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(fb(jnp.asarray(x))), ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("offset", [0.0, 4.0, 16.0, 64.0])
def test_bfloat16_batch_statistics_err_less_than_the_inputs_rounding(offset):
    """bf16 inputs get one-pass statistics (E[x^2] - E[x]^2 in float32). Its cancellation error grows as
    (mean/std)^2 * 2^-24; the inputs' own rounding to bf16 already moves the variance by about
    (mean/std)^2 * 2^-18 / 3, so the one-pass error must stay well under what rounding did, at any offset."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((8, 16, 16, 32)) + offset).astype(np.float32)
    mask = np.array([1, 1, 1, 0, 1, 1, 0, 1], np.float32)
    xb = jnp.asarray(x, jnp.bfloat16)
    bn = BatchNorm(32, momentum=1.0, dtype=jnp.bfloat16)  # momentum 1: the running stats are this batch's
    bn(xb, jnp.asarray(mask))
    kept, kept_rounded = x[mask > 0].astype(np.float64), np.asarray(xb, np.float64)[mask > 0]
    var = kept_rounded.var(axis=(0, 1, 2), ddof=1)
    rounding = np.abs(kept.var(axis=(0, 1, 2), ddof=1) - var) / var
    err = np.abs(np.asarray(bn.var[...]) - var) / var
    assert np.median(err) < np.median(rounding) / 4 + 4 * np.finfo(np.float32).eps
    std = np.sqrt(var)
    assert np.max(np.abs(np.asarray(bn.mean[...]) - kept_rounded.mean(axis=(0, 1, 2))) / std) < 1e-6 * (1 + offset)


@pytest.mark.parametrize("size", [7, 16, 31])
def test_max_pool_and_its_gradient_are_torchs_ties_included(size):
    """MaxPool2d(3, 2, padding=1): values, and the gradient routed to each window's first maximum, as PyTorch does.
    Small integers make ties everywhere (as ReLU's zeros do); the reference is PyTorch in float64, and the only
    difference allowed is float32 rounding of the sums where windows overlap (at most 4 per input)."""
    from resnet_flax.layers import max_pool

    rng = np.random.default_rng(size)
    x = rng.integers(0, 3, (2, size, size, 5)).astype(np.float32)
    y = max_pool(jnp.asarray(x), 3, 2, 1)
    g = rng.standard_normal(y.shape).astype(np.float32)
    gx = jax.vjp(lambda v: max_pool(v, 3, 2, 1), jnp.asarray(x))[1](jnp.asarray(g))[0]
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64)).requires_grad_()
    yt = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
    yt.backward(torch.from_numpy(g.transpose(0, 3, 1, 2).astype(np.float64)))
    np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1))
    ref = xt.grad.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(gx), ref, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(g).max())
    assert np.count_nonzero(np.asarray(gx)) == np.count_nonzero(ref)  # the same inputs receive gradient


def test_max_pool_backward_reads_the_stored_first_maximum():
    """On the CPU the backward pass reads each window's first-maximum offset (int8) as stored by the forward
    pass, rather than XLA recomputing the comparisons (and the layers before them) inside it."""
    import re

    from resnet_flax.layers import max_pool

    x = jnp.zeros((2, 8, 8, 4))

    def loss(x):
        return jnp.sum(max_pool(jax.nn.relu(x * 2.0 + 1.0), 3, 2, 1))

    assert re.search(r"\(s8\[2,4,4,4\]\{[\d,]*\}\) conditional\(", jax.jit(jax.grad(loss)).lower(x).compile().as_text())
    assert " conditional(" not in jax.jit(loss).lower(x).compile().as_text()


def test_forward_mode_agrees_with_reverse_mode():
    """jax.jvp through a whole model (the CPU's custom conv and max-pool rules included) gives the directional
    derivative that the gradient does: <grad f(x), t> = jvp f(x) t, both float32 sums of the same terms."""
    m = resnet_flax.create_model("resnet10t", num_classes=4)  # a max-pool, and both conv forms at 32 px
    m.eval()
    graphdef, state = nnx.split(m)
    x, t = (jax.random.normal(jax.random.key(k), (2, 32, 32, 3)) for k in (3, 4))
    w = jax.random.normal(jax.random.key(5), (2, 4))

    def f(x):
        return jnp.sum(nnx.merge(graphdef, state)(x) * w)

    forward = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,))[1])(x, t)
    grad = jax.jit(jax.grad(f))(x)
    reverse = jnp.vdot(grad, t)
    scale = jnp.vdot(jnp.abs(grad), jnp.abs(t))  # the sum's size without cancellation
    # Measured equal; summed in another order they would differ by float32 rounding, ~1e-7 of the scale.
    assert abs(float(forward - reverse)) <= 1e-6 * float(scale)


def test_train_and_eval_modes_switch_batchnorm():
    m = resnet_flax.resnet18(num_classes=4)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    m.eval()
    before = np.asarray(m.layer1[0].bn1.mean[...]).copy()
    m(x)
    np.testing.assert_array_equal(np.asarray(m.layer1[0].bn1.mean[...]), before)
    m.train()
    m(x)
    assert not np.allclose(np.asarray(m.layer1[0].bn1.mean[...]), before)
    view = nnx.view(m, use_running_average=True)
    assert view.bn1.use_running_average and not m.bn1.use_running_average


def test_jit_forward_equals_eager():
    m = resnet_flax.resnet18(num_classes=4)
    m.eval()
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda mm, xx: mm(xx))(m, x)), np.asarray(m(x)),
                               rtol=1e-5, atol=1e-6)


def test_head_is_one_pooled_path_under_bfloat16():
    m = resnet_flax.resnet18(num_classes=10, seed=0, dtype=jnp.bfloat16)
    m.eval()
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    feats = m.forward_features(x)
    pre = m.forward_head(feats, pre_logits=True)
    assert feats.shape == (2, 1, 1, 512) and pre.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(m.fc(pre).astype(jnp.float32)), np.asarray(m(x)))  # pre is fc's input
    np.testing.assert_array_equal(np.asarray(m.embed(x)), np.asarray(pre.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(m.forward_head(feats)), np.asarray(m(x)))


def test_reset_classifier_gives_a_fresh_head():
    m = resnet_flax.resnet50(num_classes=1000, seed=0)
    m.reset_classifier(7, seed=1)
    assert m.config.num_classes == 7 and m.fc.kernel.shape == (2048, 7) and m.fc.bias.shape == (7,)
    bound = 1 / np.sqrt(2048)  # torch.nn.Linear's initialisation
    assert np.all(np.abs(np.asarray(m.fc.kernel[...])) <= bound) and np.std(np.asarray(m.fc.kernel[...])) > bound / 3
    m.eval()
    assert m(jnp.zeros((1, 32, 32, 3))).shape == (1, 7)
    assert resnet_flax.arch_config("resnet50", num_classes=7) == m.config
    m.reset_classifier(0)  # headless, as timm: __call__ gives the pooled features
    assert m.fc is None and m.config.num_classes == 0 and m(jnp.zeros((1, 32, 32, 3))).shape == (1, 2048)


def batchnorm_stats(x: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Running mean and var of a fresh BatchNorm after one train-mode call, and its output."""
    bn = BatchNorm(x.shape[-1])
    y = bn(jnp.asarray(x), None if mask is None else jnp.asarray(mask))
    return np.asarray(bn.mean[...]), np.asarray(bn.var[...]), np.asarray(y)


def test_masked_examples_do_not_move_batchnorm_statistics():
    rng = np.random.default_rng(0)
    clean = (rng.standard_normal((6, 5, 5, 8)) * 3 + 2).astype(np.float32)
    junk = np.concatenate([np.zeros((1, 5, 5, 8)), np.full((1, 5, 5, 8), 1e4)]).astype(np.float32)
    x = np.concatenate([clean[:2], junk[:1], clean[2:], junk[1:]])  # placeholders anywhere in the batch
    mask = np.array([1, 1, 0, 1, 1, 1, 1, 0], np.float32)
    x64 = clean.astype(np.float64)  # the reference: the clean sub-batch in float64, PyTorch's update rule
    n = x64.size // 8
    ref_mean = 0.1 * x64.mean(axis=(0, 1, 2))
    ref_var = 0.9 + 0.1 * x64.var(axis=(0, 1, 2)) * n / (n - 1)
    mean_c, var_c, y_c = batchnorm_stats(clean)
    mean_m, var_m, y_m = batchnorm_stats(x, mask)
    # float32 rounding of the clean sub-batch alone, measured against float64, bounds the masked path's error
    # (x2: the same sums taken over a longer array with zeros, so in another order; one ulp if it measured 0)
    for ours, clean32, ref in ((mean_m, mean_c, ref_mean), (var_m, var_c, ref_var)):
        noise = max(float(np.max(np.abs(clean32 - ref))), float(np.finfo(np.float32).eps * np.max(np.abs(ref))))
        assert float(np.max(np.abs(ours - ref))) <= 2 * noise
    leaky_mean, _, _ = batchnorm_stats(x)  # without the mask the placeholders would dominate
    assert float(np.max(np.abs(leaky_mean - ref_mean))) > 100
    y_noise = float(np.max(np.abs(y_c - batchnorm_stats(clean[::-1])[2][::-1])))  # reordering the batch
    np.testing.assert_allclose(y_m[mask > 0], y_c, rtol=0, atol=2 * max(y_noise, 1e-6))
    bad = x.copy()
    bad[2], bad[7, 0] = np.nan, np.inf  # placeholders that hold anything: still left out, exactly as before
    for a, b in zip(batchnorm_stats(bad, mask), (mean_m, var_m)):
        np.testing.assert_array_equal(a, b)
    all_ones = batchnorm_stats(clean, np.ones(6, np.float32))
    for a, b in zip(all_ones, (mean_c, var_c, y_c)):
        np.testing.assert_allclose(a, b, rtol=2 * np.finfo(np.float32).eps, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "resnet10t"])  # resnet10t: BatchNorms in the deep stem and shortcuts
def test_masked_examples_do_not_move_a_train_step(arch):
    """Through the model and train.steps: a batch with masked placeholders trains as its clean examples do."""
    from train.steps import OptimConfig, create_train_state, jit_steps, make_optimizer

    rng = np.random.default_rng(1)
    clean = rng.standard_normal((4, 32, 32, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 3], np.int32)
    cfg = OptimConfig(total_steps=2, optimizer="sgd", lr=0.1, warmup_steps=0, label_smoothing=0.0)
    tx = make_optimizer(cfg)
    graphdef, state0 = create_train_state(resnet_flax.create_model(arch, num_classes=4, seed=0), tx)
    step, _ = jit_steps(graphdef, cfg)

    def after(images, labels, mask):
        state = jax.tree.map(jnp.array, state0)  # the step donates its input
        new, metrics = step(state, {"image": images, "label": labels, "mask": mask})
        stats = np.concatenate([np.ravel(v) for v in jax.tree.leaves(jax.device_get(new.batch_stats))])
        return stats, float(metrics["train_loss"])

    ref, ref_loss = after(clean, labels, np.ones(4, np.float32))
    order = np.array([2, 0, 3, 1])  # reordering noise: the same examples, other float32 summation order
    reordered, _ = after(clean[order], labels[order], np.ones(4, np.float32))
    noise = float(np.max(np.abs(reordered - ref)))
    images = np.concatenate([clean[:2], np.zeros((1, 32, 32, 3)), clean[2:], np.full((1, 32, 32, 3), 50.0)])
    masked, loss = after(images.astype(np.float32), np.array([0, 1, 0, 2, 3, 0], np.int32),
                         np.array([1, 1, 0, 1, 1, 0], np.float32))
    assert 0 < noise < 1e-3, noise
    assert float(np.max(np.abs(masked - ref))) <= 3 * noise
    assert loss == pytest.approx(ref_loss, rel=1e-5)


# --- timm's options: deep stem, average-pool shortcuts, squeeze-and-excitation ------------------

def stage_shapes(model, shape):
    """Shapes of ``model.stages`` on an input of ``shape``, traced abstractly (no compute)."""
    out = nnx.eval_shape(lambda m, x: m.stages(x), model, jax.ShapeDtypeStruct(shape, jnp.float32))
    return {k: v.shape for k, v in out.items()}


def test_timm_options_structure():
    m = abstract_model(resnet_flax.arch_config("resnet10t", num_classes=4))
    assert [type(layer).__name__ for layer in m.conv1] == ["Conv", "BatchNorm", "ReLU", "Conv", "BatchNorm", "ReLU",
                                                           "Conv"]
    assert [m.conv1[i].kernel.shape for i in (0, 3, 6)] == [(3, 3, 3, 24), (3, 3, 24, 32), (3, 3, 32, 64)]
    assert isinstance(m.layer2[0].downsample[0], AvgPoolShortcut) and m.layer2[0].downsample[0].stride == 2
    assert stage_shapes(m, (1, 48, 40, 3)) == {  # ceil mode on odd sizes
        "layer1": (1, 12, 10, 64), "layer2": (1, 6, 5, 128), "layer3": (1, 3, 3, 256), "layer4": (1, 2, 2, 512)}
    assert abstract_model(resnet_flax.arch_config("resnet50d")).conv1[0].kernel.shape == (3, 3, 3, 32)
    se = abstract_model(resnet_flax.arch_config("seresnet50")).layer4[0].se
    assert se.fc1.kernel.shape == (1, 1, 2048, 128) and se.fc2.bias.shape == (2048,)


def test_timm_options_with_dilation():
    config = resnet_flax.arch_config("resnet26d", replace_stride_with_dilation=(False, True, True))
    assert stage_shapes(abstract_model(config), (1, 64, 64, 3)) == {
        "layer1": (1, 16, 16, 256), "layer2": (1, 8, 8, 512), "layer3": (1, 8, 8, 1024), "layer4": (1, 8, 8, 2048)}


def test_timm_options_initialisation():
    m = resnet_flax.resnet10t(num_classes=4, seed=1)  # the smallest; timm inits SE and stem convs like the rest
    k = np.asarray(m.conv1[3].kernel[...])  # (3, 3, 24, 32): fan_out = 3*3*32
    assert abs(k.std() - np.sqrt(2.0 / (9 * 32))) / np.sqrt(2.0 / (9 * 32)) < 0.05
    np.testing.assert_array_equal(np.asarray(m.conv1[1].scale[...]), 1.0)


@pytest.mark.parametrize("size", [(6, 6), (7, 5), (1, 3)])
def test_avg_pool_shortcut_matches_torch(size):
    x = np.random.default_rng(0).standard_normal((2, 4, *size)).astype(np.float32)
    ref = torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)(torch.from_numpy(x)).numpy()
    out = AvgPoolShortcut(2)(jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, rtol=1e-6, atol=1e-7)
    same = timm.layers.AvgPool2dSame(2, 1, ceil_mode=True, count_include_pad=False)(torch.from_numpy(x)).numpy()
    out = AvgPoolShortcut(1, dilation=2)(jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), same, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(AvgPoolShortcut(1)(jnp.asarray(x)), x)


def test_se_channels_are_timms():
    for c in (8, 64, 100, 128, 200, 256, 1000, 2048):
        assert se_channels(c) == timm.layers.make_divisible(c / 16, 8, round_limit=0.0), c


def test_timm_option_errors():
    with pytest.raises(ValueError, match="stem_type must be one of"):
        ResNetConfig("basic", (1, 1, 1, 1), stem_type="wide")
    with pytest.raises(ValueError, match="stem_width 32 needs a deep stem"):
        ResNetConfig("basic", (1, 1, 1, 1), stem_width=32)
    with pytest.raises(ValueError, match="avg_down must be true or false"):
        ResNetConfig("basic", (1, 1, 1, 1), avg_down=1)
    c = ResNetConfig("bottleneck", (1, 2, 1, 1), stem_type="deep", stem_width=16, avg_down=True, se=True)
    assert ResNetConfig.from_dict(c.to_dict()) == c and resnet_flax.arch_name(c) is None
    old = {k: v for k, v in resnet_flax.arch_config("resnet18").to_dict().items()
           if k not in ("stem_type", "stem_width", "avg_down", "se")}  # a header written before these options
    assert ResNetConfig.from_dict(old) == resnet_flax.arch_config("resnet18")
