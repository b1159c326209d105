"""BatchNorm folding: the folded inference function gives the eval-mode model's logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import resnet_flax
from resnet_flax.conv import CPU_EVAL_OPTIONS
from resnet_flax.fuse import fold_batchnorm
from resnet_flax.io import abstract_model, load_flat_state


def random_model(config: resnet_flax.ResNetConfig, seed: int, dtype=jnp.float32) -> resnet_flax.ResNet:
    """An eval-mode model with He-scaled random weights and non-trivial BatchNorm state (as a trained one has).

    Filled from numpy into an abstract model: much faster than the random initialisers on this CPU.
    """
    rng = np.random.default_rng(seed)
    model = abstract_model(config, dtype)
    arrays = {}
    for key, shape in ((k, v.shape) for k, v in _shapes(model).items()):
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "kernel":
            arrays[key] = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif leaf in ("scale", "var"):
            arrays[key] = rng.uniform(0.5, 1.5, shape)
        elif leaf == "num_batches_tracked":
            arrays[key] = np.zeros(shape, np.int32)
        else:  # BatchNorm bias and running mean, fc bias
            arrays[key] = rng.normal(0.0, 0.1, shape)
    load_flat_state(model, arrays)
    model.eval()
    return model


def _shapes(model: resnet_flax.ResNet) -> dict:
    return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(nnx.state(model))}


def eval_logits(model: resnet_flax.ResNet, x: jax.Array) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


CASES = {
    "resnet18": resnet_flax.arch_config("resnet18", num_classes=10),
    "grouped-bottleneck-dilated": resnet_flax.ResNetConfig(
        "bottleneck", (1, 1, 2, 1), num_classes=7, groups=4, width_per_group=16,
        replace_stride_with_dilation=(False, True, True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_folded_logits_match_eval_model(case):
    model = random_model(CASES[case], seed=0)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 64, 64, 3)), jnp.float32)
    expected = eval_logits(model, x)
    apply_fn, params = fold_batchnorm(model)
    got = np.asarray(jax.jit(apply_fn)(params, x))
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert rel_err(got, expected) < 1e-5
    assert np.abs(expected).max() > 1e-2  # the comparison is not between two near-zero outputs


def test_folding_removes_batchnorm_and_keeps_the_model():
    model = random_model(resnet_flax.arch_config("resnet18", num_classes=5), seed=3)
    before = {k: np.asarray(v) for k, v in resnet_flax.flat_state(model).items()}
    _, params = fold_batchnorm(model)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    names = {str(path[-1]) for path, _ in leaves}
    assert names == {"['kernel']", "['bias']"}
    # 20 convs (stem, 16 in blocks, 3 downsample) each with a bias, plus fc kernel and bias.
    assert len(leaves) == 2 * 20 + 2
    after = resnet_flax.flat_state(model)
    assert all(np.array_equal(before[k], np.asarray(after[k])) for k in before)
    stem_scale = before["bn1.scale"] / np.sqrt(before["bn1.var"] + 1e-5)
    np.testing.assert_allclose(np.asarray(params["stem"]["kernel"]), before["conv1.kernel"] * stem_scale, rtol=1e-6)


def test_folded_bfloat16_follows_the_compute_dtype():
    model = random_model(resnet_flax.arch_config("resnet18", num_classes=10), seed=4, dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 64, 64, 3)), jnp.float32)
    apply_fn, params = fold_batchnorm(model)
    got = jax.jit(apply_fn)(params, x)
    assert got.dtype == jnp.float32
    assert rel_err(got, eval_logits(model, x)) < 3e-2  # bf16 rounds differently once BN is folded; same network


def test_cpu_compiler_options_compile_and_keep_the_logits():
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU options")
    model = random_model(resnet_flax.arch_config("resnet18", num_classes=10), seed=6)
    x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 64, 64, 3)), jnp.float32)
    apply_fn, params = fold_batchnorm(model)
    got = jax.jit(apply_fn, compiler_options=CPU_EVAL_OPTIONS)(params, x)
    assert rel_err(got, eval_logits(model, x)) < 1e-5


def test_inference_fn_is_the_folded_eval_forward_and_reads_the_model_once():
    model = random_model(resnet_flax.arch_config("resnet18", num_classes=10), seed=8)
    x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 32, 32, 3)), jnp.float32)  # 1x1 last-stage map
    expected = eval_logits(model, x)
    forward = resnet_flax.inference_fn(model)
    assert rel_err(forward(x), expected) < 1e-5
    model.fc.bias[...] = model.fc.bias[...] + 1.0  # later changes to the model are not seen: call it again
    assert rel_err(forward(x), expected) < 1e-5
    assert rel_err(resnet_flax.inference_fn(model)(x), expected + 1.0) < 1e-5
