"""The optimisation parts of the recipes against their references: timm's Lamb, LARS, timm's BinaryCrossEntropy,
and gradient accumulation against the big batch. Tiny parameter trees; each bar is measured against float64."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from train.steps import OptimConfig, lr_schedule, make_optimizer

# a conv kernel, BatchNorm scale/bias, a linear kernel and bias: both sides of the decay mask
SHAPES = {"conv": {"kernel": (3, 3, 4, 8)}, "bn": {"bias": (8,), "scale": (8,)}, "fc": {"bias": (5,),
                                                                                       "kernel": (8, 5)}}
STEPS = 6


def leaves(tree: dict, prefix: str = "") -> dict[str, tuple]:
    """``{"conv.kernel": shape, ...}`` of a nested dict."""
    out = {}
    for k, v in tree.items():
        out.update(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def draws(seed: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Initial parameters and one gradient per step (float64), some steps above global norm 1, some below."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(0, 0.5, s) for k, s in leaves(SHAPES).items()}
    params["bn.scale"] += 1.0
    scales = [3.0, 0.02, 1.0, 0.05, 2.0, 0.01]  # global norms from ~0.1 to ~30: clipped and not
    grads = [{k: rng.normal(0, scales[t] / 8, s) for k, s in leaves(SHAPES).items()} for t in range(STEPS)]
    return params, grads


def nest(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for k, v in flat.items():
        a, b = k.split(".")
        out.setdefault(a, {})[b] = v
    return out


@functools.cache
def compiled_update(cfg: OptimConfig) -> tuple:
    """``make_optimizer(cfg)`` and its jitted update (jit keys its cache on the x64 mode itself)."""
    import jax

    tx = make_optimizer(cfg)
    return tx, jax.jit(tx.update)


def run_ours(cfg: OptimConfig, params: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]],
             dtype: str = "float32") -> dict[str, np.ndarray]:
    """The CLI's optimizer (``make_optimizer``) over the given gradients, in ``dtype``."""
    import jax
    import jax.numpy as jnp
    import optax

    with jax.enable_x64(dtype == "float64"):
        tx, update = compiled_update(cfg)
        p = jax.tree.map(lambda x: jnp.asarray(x, dtype), nest(params))
        state = tx.init(p)
        for g in grads:
            u, state = update(jax.tree.map(lambda x: jnp.asarray(x, dtype), nest(g)), state, p)
            p = optax.apply_updates(p, u)
        return {f"{a}.{b}": np.asarray(v, np.float64) for a, d in p.items() for b, v in d.items()}


def run_torch(make: callable, cfg: OptimConfig, params: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]],
              dtype: torch.dtype) -> dict[str, np.ndarray]:
    """A torch optimizer from ``make(module)`` over the same gradients, its lr set each step to our schedule's."""
    module = torch.nn.Module()
    for k, v in params.items():  # named as timm's param_groups_weight_decay sees them: ndim <= 1 -> no decay
        module.register_parameter(k.replace(".", "_"), torch.nn.Parameter(torch.tensor(v, dtype=dtype)))
    import jax

    opt = make(module)
    with jax.enable_x64(dtype == torch.float64):  # the values ours uses: its int32 step count gives float32
        lrs = [float(lr_schedule(cfg)(jax.numpy.int32(t))) for t in range(len(grads))]
    for t, g in enumerate(grads):
        for group in opt.param_groups:
            group["lr"] = lrs[t]
        for k, v in g.items():
            module.get_parameter(k.replace(".", "_")).grad = torch.tensor(v, dtype=dtype)
        opt.step()
    return {k: module.get_parameter(k.replace(".", "_")).detach().double().numpy() for k in params}


def run_mlperf_lars(cfg: OptimConfig, params: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]],
                    dtype: torch.dtype) -> dict[str, np.ndarray]:
    """MLPerf's LARS written out from its TensorFlow ``LARSOptimizer`` (no library in the venv puts the learning
    rate inside the momentum buffer): ``v <- m v + lr * ratio * (g + wd w); w <- w - v`` on kernels, with
    ``ratio = eta |w| / (|g| + wd |w|)``; ``v <- m v + lr g`` on the skipped BatchNorm parameters and biases."""
    import jax

    with jax.enable_x64(dtype == torch.float64):
        lrs = [float(lr_schedule(cfg)(jax.numpy.int32(t))) for t in range(len(grads))]
    w = {k: torch.tensor(v, dtype=dtype) for k, v in params.items()}
    v = {k: torch.zeros_like(x) for k, x in w.items()}
    for lr, g in zip(lrs, grads):
        for k in w:
            grad = torch.tensor(g[k], dtype=dtype)
            if w[k].ndim > 1:
                w_norm, g_norm = w[k].norm(), grad.norm()
                ratio = 0.001 * w_norm / (g_norm + cfg.weight_decay * w_norm)
                grad = (grad + cfg.weight_decay * w[k]) * ratio
            v[k] = cfg.momentum * v[k] + lr * grad
            w[k] = w[k] - (lr * grad + cfg.momentum * v[k] if cfg.nesterov else v[k])
    return {k: x.double().numpy() for k, x in w.items()}


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def timm_lamb(cfg: OptimConfig) -> callable:
    from timm.optim import create_optimizer_v2

    return lambda m: create_optimizer_v2(m, opt="lamb", lr=cfg.lr, weight_decay=cfg.weight_decay)


def timm_lars(cfg: OptimConfig) -> callable:
    """timm's Lars is the MLPerf formula (apex LARC's) with the learning rate outside the momentum buffer: equal to
    MLPerf's under a constant lr only, so the LARS comparison uses one. eps 0 as MLPerf's."""
    from timm.optim import Lars
    from timm.optim._param_groups import param_groups_weight_decay

    return lambda m: Lars(param_groups_weight_decay(m, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov, eps=0.0)


CASES = {
    # RSB's LAMB: warm-up + cosine over the steps, weight decay on kernels; and without weight decay (then timm
    # adapts nothing: Adam with clipping)
    "lamb": (OptimConfig(total_steps=STEPS, optimizer="lamb", lr=5e-3, warmup_steps=2, weight_decay=0.02), timm_lamb),
    "lamb-no-decay": (OptimConfig(total_steps=STEPS, optimizer="lamb", lr=5e-3, warmup_steps=2, weight_decay=0.0),
                      timm_lamb),
    # LARS: constant lr (warm-up 0 and a cosine far longer than the steps is not constant; total_steps huge is)
    "lars": (OptimConfig(total_steps=10**9, optimizer="lars", lr=2.0, warmup_steps=0, weight_decay=5e-5,
                         nesterov=False), timm_lars),
    "lars-nesterov": (OptimConfig(total_steps=10**9, optimizer="lars", lr=2.0, warmup_steps=0, weight_decay=1e-4,
                                  nesterov=True), timm_lars),
    # MLPerf's LARS under warm-up + cosine, the learning rate inside the buffer
    "lars-schedule": (OptimConfig(total_steps=STEPS, optimizer="lars", lr=2.0, warmup_steps=2, weight_decay=5e-5,
                                  nesterov=False), "mlperf"),
}


def run_reference(reference: callable | str, cfg: OptimConfig, params: dict[str, np.ndarray],
                  grads: list[dict[str, np.ndarray]], dtype: torch.dtype) -> dict[str, np.ndarray]:
    if reference == "mlperf":
        return run_mlperf_lars(cfg, params, grads, dtype)
    return run_torch(reference(cfg), cfg, params, grads, dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_equals_its_reference(case):
    """Six steps from the same parameters with the same gradients (timm's Lamb for LAMB; for LARS timm's Lars, the
    library implementation of MLPerf's formula in the venv, and under a schedule MLPerf's written out: timm's puts
    the rate outside the buffer, 4.5 apart after these steps). In float64 ours equals the reference to float64
    rounding: the float32 reference's own error rescaled to float64's precision (2^-29), x4 for an estimate from
    three draws (measured: at most 0.8x of that). In float32 ours is within 2x of the reference's own float32
    error (XLA:CPU's float32 division is not correctly rounded; measured over 8 draws: at most 1.3x)."""
    cfg, reference = CASES[case]
    theirs, ours, ours64 = [], [], []
    for seed in range(3):
        params, grads = draws(seed)
        exact = run_reference(reference, cfg, params, grads, torch.float64)
        theirs.append(max_diff(run_reference(reference, cfg, params, grads, torch.float32), exact))
        ours.append(max_diff(run_ours(cfg, params, grads), exact))
        ours64.append(max_diff(run_ours(cfg, params, grads, "float64"), exact) / theirs[-1])
        assert max_diff(exact, params) > 1e4 * theirs[-1]  # the steps moved the parameters far beyond the noise
    assert max(ours64) <= 4 * 2.0**-29, (ours64, theirs)
    assert max(ours) <= 2 * max(theirs), (ours, theirs)


def bce_inputs(dtype: str) -> list[tuple]:
    """(logits, class indices or timm's dense targets, our [batch, classes] targets, smoothing, threshold): one-hot
    targets smoothed by the loss (RSB without mixing), mixed targets smoothed before mixing as timm's Mixup does,
    and RSB's target threshold on both."""
    from train.mixing import mixup

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (16, 10))
    labels = rng.integers(0, 10, 16)
    one_hot = np.eye(10)[labels]
    lam = 0.63
    smoothed = one_hot * 0.9 + 0.1 / 10
    timm_mixed = smoothed * lam + np.roll(smoothed, 1, axis=0) * (1 - lam)  # timm's mixup_target, our pairing
    _, ours_mixed = mixup(np.zeros((16, 1, 1, 1), np.float32), one_hot.astype(np.float32), np.ones(16, np.float32),
                          lam)
    cases = []
    for thresh in (None, 0.2):
        cases.append((logits, labels, one_hot, 0.1, thresh))
        cases.append((logits, timm_mixed.astype(dtype), np.asarray(ours_mixed), 0.1, thresh))
    return cases


def test_flags_that_need_another_flag_are_refused():
    from train.config import parse_config

    for argv in (["--bce-target-thresh", "0.2"], ["--batch-size", "10", "--grad-accum-steps", "4"]):
        with pytest.raises(SystemExit) as e:
            parse_config(argv)
        assert e.value.code == 2
    cfg = parse_config(["--optimizer", "lars", "--loss", "bce", "--bce-target-thresh", "0.2",
                        "--grad-accum-steps", "4"])
    assert (cfg.optimizer, cfg.loss, cfg.bce_target_thresh, cfg.grad_accum_steps) == ("lars", "bce", 0.2, 4)


def timm_bce(ref: torch.nn.Module, logits: np.ndarray, target: np.ndarray, dtype: torch.dtype) -> float:
    """timm's loss in ``dtype`` (class indices stay integers)."""
    t = torch.tensor(target, dtype=dtype) if target.ndim == 2 else torch.tensor(target)
    return float(ref(torch.tensor(logits, dtype=dtype), t))


def test_bce_equals_timms_binary_cross_entropy():
    """Our loss on the same logits and targets as timm's ``BinaryCrossEntropy`` (smoothing 0.1 for class indices;
    0 for dense targets that timm's Mixup smoothed, as timm's train.py builds it): in float32 within 2x of timm's
    own float32 error against its float64 result."""
    import jax.numpy as jnp
    from timm.loss import BinaryCrossEntropy

    from train.steps import binary_cross_entropy

    for logits, target, ours_targets, smoothing, thresh in bce_inputs("float64"):
        dense = target.ndim == 2
        ref = BinaryCrossEntropy(smoothing=0.0 if dense else smoothing, target_threshold=thresh)

        exact = timm_bce(ref, logits, target, torch.float64)
        theirs = abs(timm_bce(ref, logits, target, torch.float32) - exact)
        ours = float(jnp.mean(binary_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(ours_targets),
                                                   smoothing, thresh)))
        assert abs(ours - exact) <= 2 * max(theirs, np.spacing(np.float32(exact))), (dense, thresh, ours, exact, theirs)


def tiny_model(bn: bool):
    """A conv (+ BatchNorm) + linear head with the ResNet's call signature: what ``train_step`` needs."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs) if bn else None
            self.fc = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x, mask=None):
            x = self.conv(x)
            if self.bn is not None:
                x = self.bn(x, mask=None if mask is None else jnp.broadcast_to(mask[:, None, None, None] > 0, x.shape))
            return self.fc(jnp.mean(jax.nn.relu(x), axis=(1, 2)))

    return Tiny(nnx.Rngs(0))


def accum_step(k: int, bn: bool, dtype: str, images: np.ndarray, labels: np.ndarray, mask: np.ndarray, **kw):
    """(state after one ``train_step`` with ``grad_accum_steps=k``, its metrics) of the tiny model, SGD."""
    import jax

    from train.steps import create_train_state, train_step

    cfg = OptimConfig(total_steps=10**9, optimizer="sgd", lr=0.5, warmup_steps=0, weight_decay=1e-4,
                      label_smoothing=0.1, grad_accum_steps=k, **kw)
    tx = make_optimizer(cfg)
    graphdef, state = create_train_state(tiny_model(bn), tx)
    with jax.enable_x64(dtype == "float64"):  # the same initial values, in float64
        state = jax.tree.map(lambda x: x.astype(dtype) if x.dtype == np.float32 else x, state)
        batch = {"image": images.astype(dtype), "label": labels, "mask": mask.astype(dtype)}
        new, metrics = jax.jit(lambda s, b: train_step(graphdef, cfg, s, b))(state, batch)
        return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get((new, metrics))), state


def flat(tree) -> np.ndarray:
    import jax

    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def accum_batch(n: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    mask = np.ones(n, np.float32)
    mask[5] = 0  # an unreadable image: out of the loss and the statistics, in whichever micro-batch
    return rng.normal(0, 1, (n, 6, 6, 3)), rng.integers(0, 3, n).astype(np.int32), mask


def test_accumulated_step_equals_the_big_batch_without_batchnorm():
    """Without BatchNorm, two micro-batches of 8 give the update of one batch of 16: as close to the float64
    big-batch step as the float32 big-batch step itself, within 2x (the same sums in another order). With mixup/
    cutmix (drawn once over the whole batch) and BCE, whose float64 run draws other mixing values, the accumulated
    step equals the float32 big-batch step within 3x that noise (2x plus the big batch's own). The optimizer
    state keeps its layout, so a checkpoint resumes with or without accumulation."""
    import jax

    images, labels, mask = accum_batch()
    (exact, _), _ = accum_step(1, False, "float64", images, labels, mask)
    (big, _), state1 = accum_step(1, False, "float32", images, labels, mask)
    (accum, _), state2 = accum_step(2, False, "float32", images, labels, mask)
    noise = np.max(np.abs(flat(big.params) - flat(exact.params)))
    assert 0 < noise < 1e-5
    assert np.max(np.abs(flat(accum.params) - flat(exact.params))) <= 2 * noise
    assert np.max(np.abs(flat(exact.params) - flat(state1.params))) > 1e3 * noise  # the step moved them
    assert jax.tree.structure(state1.opt_state) == jax.tree.structure(state2.opt_state)
    mixed = {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "loss": "bce"}
    (big, _), _ = accum_step(1, False, "float32", images, labels, mask, **mixed)
    (accum, _), _ = accum_step(2, False, "float32", images, labels, mask, **mixed)
    assert np.max(np.abs(flat(accum.params) - flat(big.params))) <= 3 * noise


def micro_batch_reference(dtype: str, images: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> tuple:
    """(params, batch stats) after SGD on the summed gradients of two micro-batches (rows 0, 2, ... and 1, 3, ...),
    each normalised by its own BatchNorm statistics and each its share of the batch's mean loss, the running
    statistics updated by one then the other: accumulation as PyTorch code does it, written out."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from train.steps import create_train_state, cross_entropy

    cfg = OptimConfig(total_steps=10**9, optimizer="sgd", lr=0.5, warmup_steps=0, weight_decay=1e-4,
                      label_smoothing=0.1)
    tx = make_optimizer(cfg)
    graphdef, state = create_train_state(tiny_model(True), tx)
    with jax.enable_x64(dtype == "float64"):
        state = jax.tree.map(lambda x: x.astype(dtype) if x.dtype == np.float32 else x, state)
        count = float(max(mask.sum(), 1))

        def loss(model, x, y, m):
            return jnp.sum(cross_entropy(model(x, m), y, 3, 0.1) * m) / count

        @jax.jit
        def step(state):
            grads, stats = jax.tree.map(jnp.zeros_like, state.params), state.batch_stats
            for k in range(2):
                model = nnx.merge(graphdef, state.params, stats)
                g = nnx.grad(loss)(model, jnp.asarray(images[k::2], dtype), labels[k::2],
                                   jnp.asarray(mask[k::2], dtype))
                grads, stats = jax.tree.map(jnp.add, grads, g), nnx.state(model, nnx.BatchStat)
            updates, _ = tx.update(grads, state.opt_state, state.params)
            return optax.apply_updates(state.params, updates), stats

        return jax.tree.map(lambda x: np.asarray(x, np.float64), step(state))


def test_accumulated_step_with_batchnorm_equals_the_micro_batches():
    """With BatchNorm each micro-batch is normalised by its own statistics (as in PyTorch, torchvision's and timm's
    accumulation alike), so the update is not the big batch's; it equals the micro-batches' written out, as close
    to their float64 result as their own float32 result is, within 2x."""
    images, labels, mask = accum_batch()
    exact = micro_batch_reference("float64", images, labels, mask)
    noise = np.max(np.abs(flat(micro_batch_reference("float32", images, labels, mask)) - flat(exact)))
    (accum, _), _ = accum_step(2, True, "float32", images, labels, mask)
    (big, _), _ = accum_step(1, True, "float32", images, labels, mask)
    assert 0 < noise < 1e-5
    assert np.max(np.abs(flat((accum.params, accum.batch_stats)) - flat(exact))) <= 2 * noise
    assert np.max(np.abs(flat((big.params, big.batch_stats)) - flat(exact))) > 1e3 * noise  # BN makes them differ


@pytest.mark.slow
def test_cli_trains_with_lamb_bce_and_accumulation_and_resumes_exactly(tmp_path):
    """``python -m train --optimizer lamb --loss bce --grad-accum-steps 2`` with mixing: three steps on an image
    folder, then the step-3 checkpoint removed and the run resumed from step 2 gives step 3's loss again, exactly;
    ``train.predict`` loads the workdir."""
    import shutil

    from PIL import Image

    from train.__main__ import main as train_main
    from train.metrics import read_metrics

    rng = np.random.default_rng(0)
    for c, name in enumerate(("red", "green", "blue")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(8):
            img = rng.integers(0, 90, (40, 48, 3), dtype=np.uint8)
            img[..., c] += 150
            Image.fromarray(img).save(tmp_path / "images" / name / f"{i}.jpg", quality=90)
    args = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--num-workers", "0", "--no-progress",
            "--optimizer", "lamb", "--loss", "bce", "--bce-target-thresh", "0.2", "--grad-accum-steps", "2",
            "--mixup-alpha", "0.1", "--cutmix-alpha", "1.0", "--lr", "5e-3", "--lr-scaling", "none",
            "--warmup-steps", "1", "--weight-decay", "0.02", "--max-steps", "3", "--log-every", "1",
            "--checkpoint-every", "1", "--data-dir", str(tmp_path / "images"), "--workdir", str(tmp_path / "wd")]

    def losses() -> dict[int, float]:
        return {r["step"]: r["train_loss"] for r in read_metrics(tmp_path / "wd" / "metrics.jsonl")
                if "train_loss" in r}

    assert train_main(args) == 0
    first = losses()
    assert sorted(first) == [1, 2, 3] and all(np.isfinite(v) for v in first.values()), first
    shutil.rmtree(tmp_path / "wd" / "checkpoints" / "3")
    assert train_main(args) == 0
    assert losses()[3] == first[3]
    from train.predict import load_from_workdir

    assert load_from_workdir(tmp_path / "wd")[1] == ["blue", "green", "red"]  # LAMB's state restores for predict


@pytest.mark.parametrize("warmup_decay, lr_min", [(0.01, 0.0), (0.0, 0.0), (1e-4, 1e-3)])
def test_warmup_and_cosine_are_torchvisions_schedulers_stepped_per_step(warmup_decay, lr_min):
    """``--lr-warmup-decay`` / ``--lr-min``: torchvision's train.py schedule (``LinearLR(start_factor=
    lr_warmup_decay, total_iters=warmup)`` then ``CosineAnnealingLR(T_max=total - warmup, eta_min=lr_min)``, joined
    by ``SequentialLR``), stepped once per step here. Both in float64: equal to float64 rounding (torch's
    schedulers update it recursively; measured 2.2e-16 of the peak, bar 20 float64 eps)."""
    import jax

    total, warmup, peak = 40, 7, 0.5
    sched = lr_schedule(OptimConfig(total_steps=total, lr=peak, warmup_steps=warmup, lr_warmup_decay=warmup_decay,
                                    lr_min=lr_min))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=warmup_decay or 1e-30, total_iters=warmup)
    main = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=lr_min)
    seq = torch.optim.lr_scheduler.SequentialLR(opt, [warm, main], milestones=[warmup])
    worst = 0.0
    for step in range(total):
        with jax.enable_x64(True):
            ours, theirs = float(sched(step)), opt.param_groups[0]["lr"]
        worst = max(worst, abs(ours - theirs) / peak)
        opt.step()
        seq.step()
    assert worst <= 20 * np.finfo(np.float64).eps
