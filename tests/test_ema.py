"""The EMA of the weights (``--model-ema``) against torchvision's ``ExponentialMovingAverage`` itself, fed the
weights our train steps produced, and its checkpoint round trip (a resumed run keeps the same average)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.config import TrainConfig
from train.steps import OptimConfig, ema_decay_for, make_optimizer

SPE, EVERY, WARMUP_EPOCHS, STEPS = 4, 3, 1, 12  # EMA updates after steps 0, 3 (copies: warm-up), 4, 7, 8, 11


def torchvision_ema(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """torchvision's ``references/classification/utils.py`` ``ExponentialMovingAverage`` as written there (the
    references are not an installed package)."""

    class ExponentialMovingAverage(torch.optim.swa_utils.AveragedModel):
        def __init__(self, model, decay, device="cpu"):
            def ema_avg(avg_model_param, model_param, num_averaged):
                return decay * avg_model_param + (1 - decay) * model_param

            super().__init__(model, device, ema_avg, use_buffers=True)

    return ExponentialMovingAverage(model, decay)


def tiny_model():
    """A conv + BatchNorm + linear head with the ResNet's call signature."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.fc = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x, mask=None):
            x = self.conv(x)
            x = self.bn(x, mask=None if mask is None else jnp.broadcast_to(mask[:, None, None, None] > 0, x.shape))
            return self.fc(jnp.mean(jax.nn.relu(x), axis=(1, 2)))

    return Tiny(nnx.Rngs(0))


def ema_config(decay: float = 0.6) -> OptimConfig:
    return OptimConfig(total_steps=STEPS, optimizer="sgd", lr=0.5, warmup_steps=WARMUP_EPOCHS * SPE,
                       weight_decay=1e-4, model_ema=True, ema_steps=EVERY, ema_decay=decay, steps_per_epoch=SPE)


def batches(n: int = STEPS) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"image": rng.normal(0, 1, (8, 6, 6, 3)).astype(np.float32),
             "label": rng.integers(0, 3, 8).astype(np.int32), "mask": np.ones(8, np.float32)} for _ in range(n)]


def train(cfg: OptimConfig, state=None, start: int = 0, stop: int = STEPS):
    """(graphdef, state, [(params, batch stats) after each step]) of the tiny model trained by ``train_step``."""
    import jax

    from train.steps import create_train_state, train_step

    tx = make_optimizer(cfg)
    graphdef, fresh = create_train_state(tiny_model(), tx, ema=True)
    state = fresh if state is None else state
    step = jax.jit(lambda s, b: train_step(graphdef, cfg, s, b))
    seen = []
    for b in batches()[start:stop]:
        state, _ = step(state, b)
        seen.append(jax.device_get((state.params, state.batch_stats)))
    return graphdef, state, seen


def flat(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def replay_torchvision(initial: list[np.ndarray], n_params: int, seen: list, decay: float, dtype: torch.dtype,
                       warmup_epochs: int = WARMUP_EPOCHS):
    """torchvision's train_one_epoch EMA bookkeeping over the weights ``seen`` after each step: update at batch
    ``i % model_ema_steps == 0`` of each epoch, then ``n_averaged.fill_(0)`` while ``epoch < lr_warmup_epochs``."""
    module = torch.nn.Module()
    for j, x in enumerate(initial):  # parameters first, then the BatchNorm statistics as buffers
        t = torch.tensor(x, dtype=dtype)
        if j < n_params:
            module.register_parameter(f"p{j}", torch.nn.Parameter(t))
        else:
            module.register_buffer(f"b{j}", t)
    ema = torchvision_ema(module, decay)
    for s, weights in enumerate(seen):
        with torch.no_grad():
            for t, x in zip(list(module.parameters()) + list(module.buffers()), flat(weights)):
                t.copy_(torch.tensor(x, dtype=dtype))
        epoch, i = divmod(s, SPE)
        if i % EVERY == 0:
            ema.update_parameters(module)
            if epoch < warmup_epochs:
                ema.n_averaged.fill_(0)
    out = [t.detach().numpy().astype(np.float64) for t in list(ema.module.parameters()) + list(ema.module.buffers())]
    return out, int(ema.n_averaged)


def test_ema_of_the_train_steps_equals_torchvisions_exponential_moving_average():
    """Fed the same weights (those our steps produced), torchvision's EMA and ours agree: parameters and BatchNorm
    statistics, copies through the warm-up epoch, the counter, and the updates at batches 0 and 3 of each 4-batch
    epoch only. In float32 ours is as close to the float64 replay as torchvision's float32 replay, within 2x
    (measured: equal, 1.5e-7; the two float32 runs differ by 1 ulp where XLA rounds the multiply-add otherwise)."""
    import jax

    decay = 0.6  # far from 1, so that a wrong step, weight or order of updates shows
    _, state, seen = train(ema_config(decay))
    _, fresh, _ = train(ema_config(decay), stop=0)
    initial = flat((fresh.params, fresh.batch_stats))
    n_params = len(jax.tree.leaves(fresh.params))
    exact, n = replay_torchvision(initial, n_params, seen, decay, torch.float64)
    ref32, _ = replay_torchvision(initial, n_params, seen, decay, torch.float32)
    ours = [x.astype(np.float64) for x in flat((state.ema.params, state.ema.batch_stats))]
    assert int(state.ema.n_averaged) == n == 4
    noise = max(np.max(np.abs(a - b)) for a, b in zip(ref32, exact))
    assert 0 < noise < 1e-6
    assert max(np.max(np.abs(a - b)) for a, b in zip(ours, exact)) <= 2 * noise
    final = [x.astype(np.float64) for x in flat(seen[-1])]
    assert max(np.max(np.abs(a - b)) for a, b in zip(ours, final)) > 1e4 * noise  # it is an average, not a copy
    # a counter never reset in the warm-up gives another average: the test tells them apart
    wrong, _ = replay_torchvision(initial, n_params, seen, decay, torch.float64, warmup_epochs=0)
    assert max(np.max(np.abs(a - b)) for a, b in zip(wrong, exact)) > 1e4 * noise


def test_ema_is_a_copy_of_the_weights_through_the_warm_up():
    """While ``epoch < lr_warmup_epochs`` torchvision resets ``n_averaged`` after each update: the EMA is the model
    as of the last update (batch 3 of the first epoch), not an average."""
    cfg = ema_config()
    _, state, seen = train(cfg, stop=SPE)
    for ema, weights in zip(flat((state.ema.params, state.ema.batch_stats)), flat(seen[EVERY])):
        np.testing.assert_array_equal(ema, weights)
    assert int(state.ema.n_averaged) == 0


def test_decay_is_adjusted_as_torchvisions_train_py_adjusts_it():
    """``adjust = world_size * batch_size * model_ema_steps / epochs`` (the global batch here, the run's epochs),
    ``alpha = min(1, (1 - decay) * adjust)``, decay ``1 - alpha``: e.g. torchvision's ResNet-50 V2 recipe (8 GPUs x
    128, 32 steps, 600 epochs) applies 1 - 2e-5 * 1024 * 32 / 600."""
    cfg = TrainConfig(model_ema=True, batch_size=1024, epochs=600, model_ema_steps=32, model_ema_decay=0.99998)
    optim = OptimConfig.for_run(cfg, total_steps=600 * 1251, steps_per_epoch=1251)
    world_size, batch_size = 8, 128
    adjust = world_size * batch_size * 32 / 600
    assert optim.ema_decay == pytest.approx(1.0 - min(1.0, (1.0 - 0.99998) * adjust), abs=1e-15)
    assert ema_decay_for(0.5, 256, 32, 1) == 0.0  # alpha capped at 1: the EMA follows the model
    assert OptimConfig.for_run(TrainConfig(), 100).ema_decay == TrainConfig.model_ema_decay  # untouched when off


def test_ema_round_trips_a_checkpoint_and_the_resumed_run_keeps_its_average(tmp_path):
    """Six steps straight equal three steps, a checkpoint written and read back into a fresh state, and three more:
    the EMA (weights, statistics, counter) is part of the saved state, bit for bit."""
    import jax

    from train.checkpoint import Checkpoints

    cfg = ema_config()
    _, straight, _ = train(cfg, stop=6)
    _, half, _ = train(cfg, stop=3)
    ckpts = Checkpoints(tmp_path, async_save=False)
    ckpts.save(3, half, {"step": 3})
    _, target, _ = train(cfg, stop=0)
    restored, meta = ckpts.restore(target, 3)
    ckpts.close()
    assert meta["step"] == 3
    _, resumed, _ = train(cfg, state=restored, start=3, stop=6)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(resumed.ema.n_averaged) == 1  # updates after steps 4 (a copy: n was 0) and nothing since


def test_predict_and_export_take_the_workdirs_ema_and_refuse_a_run_without_one(tmp_path, capsys):
    """``train.predict --ema`` (``load_from_workdir(ema=True)``) gives the checkpoint's EMA weights, the plain call
    the model's; ``train.export --ema`` writes them (with the run's class names, marked "ema"); a run kept without
    ``--model-ema`` is refused in one line (exit 2)."""
    import dataclasses

    import jax
    from flax import nnx

    from resnet_flax.model import ResNet
    from resnet_flax.registry import ARCHS
    from train.checkpoint import Checkpoints
    from train.predict import load_from_workdir, main
    from train.run_file import write_run_file
    from train.steps import create_train_state

    # resnet10t's train state with an EMA unlike the weights, as numpy values: nothing to compile
    config = dataclasses.replace(ARCHS["resnet10t"], num_classes=2)
    tx = make_optimizer(OptimConfig(total_steps=1, optimizer="sgd"))
    _, shapes = nnx.eval_shape(lambda: create_train_state(ResNet(config, rngs=nnx.Rngs(0)), tx, ema=True))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), shapes)
    state = state.replace(ema=state.ema.replace(params=jax.tree.map(lambda x: x * np.float32(0.5), state.params),
                                                n_averaged=np.int32(3)))
    for ema, wd in ((True, tmp_path / "ema"), (False, tmp_path / "plain")):
        write_run_file(dataclasses.replace(TrainConfig(optimizer="sgd", model_ema=ema), workdir=wd), config, ["a", "b"])
        ckpts = Checkpoints(wd, async_save=False)
        ckpts.save(1, state if ema else state.replace(ema=None), {"step": 1})
        ckpts.close()
    averaged, _, _ = load_from_workdir(tmp_path / "ema", ema=True)
    weights, _, _ = load_from_workdir(tmp_path / "ema")
    for a, w in zip(jax.tree.leaves(nnx.state(averaged, nnx.Param)), jax.tree.leaves(nnx.state(weights, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(w) * np.float32(0.5))
    assert jax.tree.structure(nnx.state(weights, nnx.Param)) == jax.tree.structure(state.params)
    from safetensors.numpy import load_file

    from resnet_flax.io import flat_state, read_metadata
    from train.export import main as export_main

    out = tmp_path / "ema.flax.safetensors"
    assert export_main([str(tmp_path / "ema"), str(out), "--ema"]) == 0
    exported, expected = load_file(str(out)), flat_state(averaged)  # the file's tensors, read without a model
    assert exported.keys() == expected.keys()
    for k, v in expected.items():
        np.testing.assert_array_equal(exported[k], np.asarray(v))
    assert read_metadata(out)["weights_set"] == "ema" and '"b"' in read_metadata(out)["class_names"]
    capsys.readouterr()
    assert export_main([str(tmp_path / "plain"), str(tmp_path / "p.flax.safetensors"), "--ema"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model-ema" in err
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    assert main([str(image), "--checkpoint", str(tmp_path / "plain"), "--ema"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model-ema" in err
