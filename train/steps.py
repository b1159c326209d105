"""Training state, optimizer, and the jit-compiled ``train_step`` / ``eval_step``.

State is a plain pytree (params, batch stats, optimizer state, step) so it can be sharded, donated
and checkpointed; the model's structure (an NNX ``GraphDef``) is static and closed over.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from resnet_flax.conv import CPU_EVAL_OPTIONS, CPU_TRAIN_OPTIONS, cpu_compiler_options
from resnet_flax.model import ResNet
from train.config import TrainConfig
from train.ema import EmaState, ema_decay_for, ema_update
from train.mixing import erase_boxes, mix_batch, mix_key
from train.optim import lamb, lars
from train.transforms import IMAGENET_MEAN, IMAGENET_STD

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree (``ema`` is None without ``--model-ema``)."""

    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    ema: EmaState | None = None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimisation recipe; ``lr`` is the peak learning rate after batch-size scaling.

    Defaults are the command line's (:class:`TrainConfig`); ``total_steps`` has none, it depends on the data.
    """

    total_steps: int
    optimizer: str = TrainConfig.optimizer  # "sgd" | "adamw" | "lamb" | "lars"
    lr: float = TrainConfig.lr
    warmup_steps: int = TrainConfig.warmup_steps
    lr_warmup_decay: float = TrainConfig.lr_warmup_decay  # the warm-up starts at lr * this
    lr_min: float = TrainConfig.lr_min
    weight_decay: float = TrainConfig.weight_decay
    momentum: float = TrainConfig.momentum
    nesterov: bool = TrainConfig.nesterov
    label_smoothing: float = TrainConfig.label_smoothing
    loss: str = TrainConfig.loss  # "ce" | "bce"
    bce_target_thresh: float | None = TrainConfig.bce_target_thresh
    grad_accum_steps: int = TrainConfig.grad_accum_steps
    mixup_alpha: float = TrainConfig.mixup_alpha
    cutmix_alpha: float = TrainConfig.cutmix_alpha
    seed: int = TrainConfig.seed  # the mixing draws': one key per (seed, step)
    model_ema: bool = TrainConfig.model_ema
    ema_steps: int = TrainConfig.model_ema_steps
    ema_decay: float = TrainConfig.model_ema_decay  # as applied: adjusted by ``ema_decay_for`` in a run
    steps_per_epoch: int | None = None  # None: the whole run is one epoch

    @classmethod
    def for_run(cls, cfg: TrainConfig, total_steps: int, steps_per_epoch: int | None = None) -> OptimConfig:
        """The recipe of a run's flags, with ``--lr`` scaled by ``--lr-scaling`` to the global batch, the warm-up
        in steps (``--lr-warmup-epochs`` x ``steps_per_epoch`` when given) and the EMA decay adjusted as
        torchvision's train.py adjusts it."""
        spe = steps_per_epoch or total_steps
        warmup = cfg.warmup_steps if cfg.lr_warmup_epochs is None else cfg.lr_warmup_epochs * spe
        decay = ema_decay_for(cfg.model_ema_decay, cfg.batch_size, cfg.model_ema_steps, total_steps / max(spe, 1)) \
            if cfg.model_ema else cfg.model_ema_decay
        return cls(total_steps=total_steps, optimizer=cfg.optimizer,
                   lr=scaled_lr(cfg.lr, cfg.batch_size) if cfg.lr_scaling == "linear" else cfg.lr,
                   warmup_steps=warmup, lr_warmup_decay=cfg.lr_warmup_decay, lr_min=cfg.lr_min,
                   weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                   nesterov=cfg.nesterov, label_smoothing=cfg.label_smoothing, loss=cfg.loss,
                   bce_target_thresh=cfg.bce_target_thresh, grad_accum_steps=cfg.grad_accum_steps,
                   mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, seed=cfg.seed,
                   model_ema=cfg.model_ema, ema_steps=cfg.model_ema_steps, ema_decay=decay,
                   steps_per_epoch=steps_per_epoch)


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """The linear scaling rule (Goyal et al. 2017): lr grows with the global batch size."""
    return base_lr * global_batch / reference_batch


def schedule_values(cfg: OptimConfig, exact: bool = False) -> dict[str, Any]:
    """The learning-rate and EMA schedules' values of ``cfg`` (run length, warm-up, learning rates, EMA decay): given
    to the compiled train step as arguments, not built into it, so that runs of one recipe share one compiled
    program (and the compilation cache's copy of it) whatever their length or learning rate, and extending a run
    compiles nothing. As float32/int32 scalars, or as Python numbers with ``exact`` (any precision, outside a step)."""
    total = cfg.total_steps
    values = {"total_steps": total, "warmup_steps": cfg.warmup_steps, "steps_per_epoch": cfg.steps_per_epoch or total,
              "lr": cfg.lr, "lr_start": cfg.lr * cfg.lr_warmup_decay, "lr_min": cfg.lr_min,
              "ema_decay": cfg.ema_decay, "ema_keep": 1.0 - cfg.ema_decay}
    return values if exact else {k: np.int32(v) if isinstance(v, int) else np.float32(v) for k, v in values.items()}


def lr_schedule(cfg: OptimConfig, values: dict[str, Any] | None = None) -> optax.Schedule:
    """Linear warm-up from ``cfg.lr * cfg.lr_warmup_decay`` to ``cfg.lr``, then cosine decay to ``cfg.lr_min`` at
    the run's last step (optax's ``warmup_cosine_decay_schedule``, written over traced values: ``values`` is
    :func:`schedule_values`'s, as arrays inside the train step; ``cfg``'s own, exact, by default)."""
    v = schedule_values(cfg, exact=True) if values is None else values

    def schedule(count: jax.Array) -> jax.Array:
        real = jnp.result_type(float)  # float32, or float64 under jax.enable_x64
        count = jnp.asarray(count)
        start, peak, end = v["lr_start"], v["lr"], v["lr_min"]
        alpha = jnp.where(peak == 0, 0.0, end / jnp.where(peak == 0, 1.0, peak))
        warmup = jnp.minimum(v["warmup_steps"], jnp.maximum(v["total_steps"] - 1, 0))
        decay_steps = (jnp.maximum(v["total_steps"], warmup + 1) - warmup).astype(real)
        frac = 1.0 - jnp.clip(count, 0, warmup).astype(real) / jnp.maximum(warmup, 1).astype(real)
        warming = (start - peak) * frac + peak
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum((count - warmup).astype(real), decay_steps) / decay_steps))
        return jnp.where(count < warmup, warming, peak * ((1.0 - alpha) * cosine + alpha))

    return schedule


def decay_mask(params: nnx.State) -> Any:
    """Weight decay on conv and linear kernels only, never on BatchNorm scale/bias or biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: OptimConfig, values: dict[str, Any] | None = None) -> optax.GradientTransformation:
    """SGD (Nesterov) momentum, AdamW, timm's LAMB or MLPerf's LARS on the warm-up + cosine schedule, decay (and
    LAMB's/LARS's layer-wise adaptation) masked as above; ``values`` as for :func:`lr_schedule`."""
    sched = lr_schedule(cfg, values)
    if cfg.optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
                           optax.sgd(sched, momentum=cfg.momentum, nesterov=cfg.nesterov))
    if cfg.optimizer == "adamw":
        return optax.adamw(sched, weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.optimizer == "lamb":
        return lamb(sched, cfg.weight_decay, decay_mask)
    if cfg.optimizer == "lars":
        return lars(sched, cfg.weight_decay, decay_mask, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd, adamw, lamb or lars")


def create_train_state(model: ResNet, tx: optax.GradientTransformation, ema: bool = False
                       ) -> tuple[nnx.GraphDef, TrainState]:
    """The train-mode structure of ``model`` and a fresh :class:`TrainState` of its weights (``model`` is unchanged);
    with ``ema``, an EMA that starts as a copy of them, as torchvision's ``AveragedModel`` (a deep copy) does."""
    train_mode = nnx.merge(*nnx.split(model))  # a new module tree over the same arrays
    train_mode.train()
    graphdef, params, batch_stats = nnx.split(train_mode, nnx.Param, nnx.BatchStat)
    copy = functools.partial(jax.tree.map, jnp.copy)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params),
                       ema=EmaState(copy(params), copy(batch_stats), jnp.zeros((), jnp.int32)) if ema else None)
    return graphdef, state


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with optional label smoothing (as torch's ``label_smoothing``)."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing) if smoothing else \
        jax.nn.one_hot(labels, num_classes)
    return optax.softmax_cross_entropy(logits, targets)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy with [batch, classes] probability targets, smoothed as torch's ``label_smoothing``
    smooths them (``targets * (1 - s) + s / classes``)."""
    return optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, smoothing) if smoothing else targets)


def binary_cross_entropy(logits: jax.Array, targets: jax.Array, smoothing: float = 0.0,
                         threshold: float | None = None) -> jax.Array:
    """Per-example timm ``BinaryCrossEntropy``: [batch, classes] probability targets smoothed as timm smooths them
    (``1 - s + s / classes`` and ``s / classes`` for one-hot), 1 above ``threshold`` and 0 else when given, then a
    sigmoid cross-entropy per class, averaged over the classes."""
    t = optax.smooth_labels(targets, smoothing) if smoothing else targets
    if threshold is not None:
        t = (t > threshold).astype(logits.dtype)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, t), axis=-1)


def normalize_images(images: jax.Array, mask: jax.Array) -> jax.Array:
    """uint8 images -> float32 ``ToTensor`` + ``Normalize`` (ImageNet mean/std) on the device, masked-out
    examples zeroed (as the host transform's blanks); float images are taken as already normalised."""
    if images.dtype != jnp.uint8:
        return images
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    x = (images.astype(jnp.float32) / jnp.float32(255.0) - mean) / std
    return jnp.where(mask[:, None, None, None] > 0, x, 0.0)


_DROP_PATH_TAG = 0x647270  # separates stochastic depth's draws from mixing's and any other use of the run's seed


def drop_path_key(seed: int, step: jax.Array) -> jax.Array:
    """Stochastic depth's key for one step of a run: the same on every host and after any resume."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed % 2**32), _DROP_PATH_TAG), step)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def all_finite(*trees: Any) -> jax.Array:
    """True when every element of every array in ``trees`` is finite (one fused reduction under ``jit``)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]))


def train_step(graphdef: nnx.GraphDef, cfg: OptimConfig, state: TrainState, batch: Batch,
               values: dict[str, jax.Array] | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step: forward in train mode, loss, gradients, optax update, BN statistics.

    ``values`` is :func:`schedule_values`'s, as arrays (``cfg``'s by default): :func:`jit_steps` passes them as
    arguments, so the step is compiled once for runs of any length and learning rate.

    Under ``jit`` with the batch sharded over a mesh the BN statistics and the loss are over the global
    batch. Masked-out examples (unreadable images) are excluded from the loss and the BatchNorm statistics.
    ``state_finite`` checks the state this step returns (the one a checkpoint would save), not just the loss
    computed before the update. Random erasing's boxes (``batch["erase"]``) and mixup/cutmix apply after the
    normalisation, in torchvision's order; with mixing, the targets are soft and top-1 counts their argmax.
    With ``grad_accum_steps`` K > 1 the (erased, mixed) batch is split into K micro-batches (example i in
    micro-batch i % K, so each device keeps its share) run one after the other; each one's loss is its share of
    the batch's mean, so the summed gradients are the batch's, except that BatchNorm normalises each micro-batch
    by its own statistics and updates its running statistics K times. A model with stochastic depth draws its
    masks from :func:`drop_path_key` (each micro-batch from its own split of it).
    """
    values = schedule_values(cfg) if values is None else values
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    mask, labels, targets = batch["mask"], batch["label"], None
    images = normalize_images(batch["image"], mask)
    if "erase" in batch:
        images = erase_boxes(images, batch["erase"])
    if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
        images, targets = mix_batch(mix_key(cfg.seed, state.step), images,
                                    jax.nn.one_hot(labels, model.fc.out_features), mask, cfg.mixup_alpha,
                                    cfg.cutmix_alpha)
        labels = jnp.argmax(targets, -1)
    elif cfg.loss == "bce":
        targets = jax.nn.one_hot(labels, model.fc.out_features)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    key = drop_path_key(cfg.seed, state.step) if getattr(model, "drop_path_rate", 0.0) else None

    def loss_fn(model, images, labels, targets, mask, key):
        logits = model(images, mask) if key is None else model(images, mask, rngs=nnx.Rngs(dropout=key))
        if cfg.loss == "bce":
            losses = binary_cross_entropy(logits, targets, cfg.label_smoothing, cfg.bce_target_thresh)
        elif targets is None:
            losses = cross_entropy(logits, labels, logits.shape[-1], cfg.label_smoothing)
        else:
            losses = soft_cross_entropy(logits, targets, cfg.label_smoothing)
        return jnp.sum(losses * mask) / count, logits

    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)  # grads w.r.t. nnx.Param
    if cfg.grad_accum_steps == 1:
        (loss, logits), grads = grad_fn(model, images, labels, targets, mask, key)
        batch_stats = nnx.state(model, nnx.BatchStat)
    else:
        loss, logits, grads, batch_stats = _accumulate(graphdef, state, grad_fn, cfg.grad_accum_steps,
                                                       (images, labels, targets, mask), key)
    tx = make_optimizer(cfg, values)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "train_loss": loss,
        "train_top1": _masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), mask),
        "grad_norm": optax.tree.norm(grads),
        "lr": lr_schedule(cfg, values)(state.step),
        "state_finite": all_finite(params, batch_stats),
    }
    ema = state.ema
    if ema is not None:
        ema = ema_update(ema, params, batch_stats, state.step, values["ema_decay"], values["ema_keep"],
                         cfg.ema_steps, values["steps_per_epoch"], values["warmup_steps"])
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                              ema=ema)
    return new_state, metrics


def _accumulate(graphdef: nnx.GraphDef, state: TrainState, grad_fn: Callable, k: int, inputs: tuple,
                key: jax.Array | None = None) -> tuple[jax.Array, jax.Array, nnx.State, nnx.State]:
    """(loss, logits, summed gradients, batch stats) of ``inputs`` run as ``k`` micro-batches under ``lax.scan``."""
    def split(x: jax.Array) -> jax.Array:  # [B, ...] -> [k, B / k, ...]; row i goes to micro-batch i % k
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    def micro_step(carry, micro):
        params, grads, batch_stats = carry  # params ride along: NNX takes no arrays from outside the scan's trace
        model = nnx.merge(graphdef, params, batch_stats)
        (loss, logits), g = grad_fn(model, *micro)
        return (params, jax.tree.map(jnp.add, grads, g), nnx.state(model, nnx.BatchStat)), (loss, logits)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (_, grads, batch_stats), (losses, logits) = jax.lax.scan(
        micro_step, (state.params, zeros, state.batch_stats),
        (*jax.tree.map(split, inputs), None if key is None else jax.random.split(key, k)))
    logits = jnp.swapaxes(logits, 0, 1).reshape(-1, logits.shape[-1])  # back in the batch's order
    return jnp.sum(losses), logits, grads, batch_stats


def eval_step(graphdef: nnx.GraphDef, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Sums (not means) of loss, top-1 and top-5 hits and example count, so padding and sharding add up; with an
    EMA, the same sums of the EMA's weights (``*_ema``) from the same batch."""
    images, labels, mask = normalize_images(batch["image"], batch["mask"]), batch["label"], batch["mask"]

    def sums(params: nnx.State, batch_stats: nnx.State) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, params, batch_stats)
        model.eval()
        logits = model(images)
        loss = cross_entropy(logits, labels, logits.shape[-1])
        topk = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        return {"loss_sum": jnp.sum(loss * mask), "top1_sum": jnp.sum((topk[:, 0] == labels) * mask),
                "top5_sum": jnp.sum(jnp.any(topk == labels[:, None], axis=-1) * mask)}

    out = {**sums(state.params, state.batch_stats), "count": jnp.sum(mask)}
    if state.ema is not None:
        out.update({f"{k}_ema": v for k, v in sums(state.ema.params, state.ema.batch_stats).items()})
    return out


class TrainStep:
    """The compiled ``train_step`` of one recipe, called as ``step(state, batch)``: it passes the run's
    :func:`schedule_values` values as arguments (replicated over the state's devices, made on first use)."""

    def __init__(self, jitted: Callable, values: dict[str, Any], sharding: Any = None):
        self.jitted, self.values, self.sharding, self._args = jitted, values, sharding, None

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        if self._args is None:
            self._args = {k: v if self.sharding is None else jax.make_array_from_callback((), self.sharding,
                                                                                          lambda _, v=v: v)
                          for k, v in self.values.items()}
        return self.jitted(state, batch, self._args)

    def lower(self, state: Any, batch: Any) -> Any:
        """``jax.jit``'s lowering, for compiling ahead of time (``--compile-only``)."""
        spec = {k: jax.ShapeDtypeStruct((), v.dtype, sharding=self.sharding) for k, v in self.values.items()}
        return self.jitted.lower(state, batch, spec)


def jit_steps(graphdef: nnx.GraphDef, cfg: OptimConfig, state_sharding: Any = None, batch_sharding: Any = None
              ) -> tuple[TrainStep, Callable[[TrainState, Batch], dict]]:
    """``train_step`` and ``eval_step`` compiled with the given shardings; the train state is donated.

    The CPU compiler options go only to a CPU compile: a TPU compile from a CPU-only process
    (``--compile-only``) is decided by the mesh's devices, not by JAX's default backend.
    """
    platform = state_sharding.mesh.devices.flat[0].platform if state_sharding is not None else "cpu"
    cpu = platform == "cpu"
    sharded = state_sharding is not None
    train = jax.jit(functools.partial(train_step, graphdef, cfg), donate_argnums=0,
                    in_shardings=(state_sharding, batch_sharding, state_sharding) if sharded else None,
                    out_shardings=(state_sharding, None) if sharded else None,
                    compiler_options=cpu_compiler_options(CPU_TRAIN_OPTIONS) if cpu else None)
    evaluate = jax.jit(functools.partial(eval_step, graphdef),
                       in_shardings=(state_sharding, batch_sharding) if sharded else None,
                       compiler_options=cpu_compiler_options(CPU_EVAL_OPTIONS) if cpu else None)
    return TrainStep(train, schedule_values(cfg), state_sharding), evaluate


def build_steps(model: ResNet, cfg: OptimConfig, state_sharding: Any, batch_sharding: Any
                ) -> tuple[TrainState, Callable, Callable]:
    """(fresh host-side state, train_step, eval_step) of ``model``: what a run and ``--compile-only`` compile."""
    tx = make_optimizer(cfg)
    graphdef, state = create_train_state(model, tx, ema=cfg.model_ema)
    train, evaluate = jit_steps(graphdef, cfg, state_sharding, batch_sharding)
    return state, train, evaluate
