"""The training run: data, model, mesh, the jit-compiled steps, checkpoints, evaluation and logging."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import resnet_flax
from resnet_flax.io import atomic_write
from resnet_flax.layers import linear
from resnet_flax.model import ResNet, ResNetConfig
from train.checkpoint import Checkpoints
from train.config import TrainConfig
from train.data import RunData, Segment, load_splits, run_schedule, steps_per_epoch
from train.metrics import MetricsLog, plot_curves
from train.steps import OptimConfig, TrainState, create_train_state, jit_steps, make_optimizer, scaled_lr

RUN_FILE = "run.json"  # model config + class names: what predict needs to rebuild the model
COMPARED_ON_RESUME = ("dataset", "data_dir", "image_size", "batch_size", "seed", "dtype", "optimizer")


class RunError(Exception):
    """A problem with the run's inputs; the message is one line that names the fix."""


class NonFiniteLoss(RunError):
    pass


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def build_model(cfg: TrainConfig, num_classes: int) -> ResNet:
    """A fresh model of ``cfg.arch``, or ``--init-from`` weights with the head resized to ``num_classes``."""
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    if cfg.init_from is None:
        return resnet_flax.create_model(cfg.resolved_arch, num_classes=num_classes, dtype=dtype,
                                        zero_init_residual=cfg.zero_init_residual, seed=cfg.seed)
    import convert

    model = convert.load_model(cfg.init_from, arch=cfg.arch, dtype=dtype)
    log(f"loaded weights from {cfg.init_from}: {convert.describe(model.config)}")
    if model.config.num_classes != num_classes:
        log(f"re-initialised the head (fc): the checkpoint has {model.config.num_classes} classes, "
            f"the data has {num_classes}")
        model.fc = linear(model.config.num_features, num_classes, dtype=dtype, rngs=nnx.Rngs(cfg.seed))
        model.config = dataclasses.replace(model.config, num_classes=num_classes)
    return model


def rebuild_model(cfg: TrainConfig) -> ResNet:
    """The structure recorded in the workdir's run.json (its weights come from the checkpoint)."""
    run = json.loads((cfg.workdir / RUN_FILE).read_text())
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    return ResNet(ResNetConfig.from_dict(run["model"]), dtype=dtype, rngs=nnx.Rngs(cfg.seed))


def make_mesh() -> tuple[NamedSharding, NamedSharding]:
    """(replicated, batch-sharded) shardings over a 1-D ``data`` mesh of every device of every host."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This host's share of the batch -> global arrays sharded over the mesh (no copy between hosts)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items() if k != "corrupt"}


def prefetch(batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding, size: int = 2
             ) -> Iterator[tuple[dict[str, jax.Array], int]]:
    """Keep ``size`` batches already on the devices, so the host never stalls the accelerator."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append((to_global(batch, sharding), int(batch["corrupt"].sum()) if "corrupt" in batch else 0))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def evaluate(evaluate_fn, state: TrainState, data: RunData, sharding: NamedSharding) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) over the whole validation split (padding is masked out)."""
    sums: dict[str, Any] = {}
    corrupt = 0
    for batch, n_bad in prefetch(data.val(), sharding):
        out = evaluate_fn(state, batch)
        sums = out if not sums else jax.tree.map(jnp.add, sums, out)
        corrupt += n_bad
    if not sums:
        return {}
    sums = jax.tree.map(float, jax.device_get(sums))
    n = max(sums["count"], 1.0)
    result = {"val_loss": sums["loss_sum"] / n, "val_top1": 100 * sums["top1_sum"] / n,
              "val_top5": 100 * sums["top5_sum"] / n, "val_examples": int(sums["count"])}
    if corrupt:
        result["val_skipped_images"] = corrupt
    return result


def write_run_file(cfg: TrainConfig, model_config: ResNetConfig, class_names: list[str]) -> None:
    """``run.json``: the model structure, class names and the flags, for predict and for resume checks."""
    flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
    record = {"model": model_config.to_dict(), "class_names": class_names, "dtype": cfg.dtype, "flags": flags}
    atomic_write(cfg.workdir / RUN_FILE, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))


def check_same_run(cfg: TrainConfig) -> None:
    """Refuse to resume a workdir written by a run with other data/model settings."""
    path = cfg.workdir / RUN_FILE
    if not path.exists():
        return
    old = json.loads(path.read_text())["flags"]
    new = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
    changed = [k for k in COMPARED_ON_RESUME if old.get(k) != new.get(k)]
    if (old.get("arch") or None) != (cfg.arch or None) and cfg.arch is not None:
        changed.append("arch")
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {old.get(k)} -> {new.get(k)}" for k in changed)
        raise RunError(f"{cfg.workdir} holds a run with other settings ({diffs}); "
                       "use a new --workdir or the original flags")


def run(cfg: TrainConfig) -> dict[str, float]:
    """Train (or evaluate with ``cfg.eval_only``); returns the last evaluation's metrics."""
    if cfg.distributed:
        jax.distributed.initialize()
    cfg.workdir = Path(cfg.workdir)
    splits = load_splits(cfg.dataset, cfg.data_dir, str(cfg.tfds_data_dir) if cfg.tfds_data_dir else None,
                         val_fraction=cfg.val_fraction)
    replicated, batch_sharding = make_mesh()
    if cfg.batch_size % jax.device_count():
        raise RunError(f"--batch-size {cfg.batch_size} is not divisible by the {jax.device_count()} devices; "
                       f"use a multiple of {jax.device_count()}")
    spe = steps_per_epoch(len(splits.train), cfg.batch_size)
    if spe == 0 and not cfg.eval_only:
        fits = len(splits.train) // jax.device_count() * jax.device_count()
        fix = f"pass --batch-size {fits} or less" if fits else "add training images"
        raise RunError(f"--batch-size {cfg.batch_size} is larger than the {len(splits.train)} training images; {fix}")
    total_steps = cfg.max_steps or cfg.epochs * spe
    peak_lr = scaled_lr(cfg.lr, cfg.batch_size) if cfg.lr_scaling == "linear" else cfg.lr
    ocfg = OptimConfig(cfg.optimizer, peak_lr, cfg.warmup_steps, total_steps, cfg.weight_decay, cfg.momentum,
                       cfg.nesterov, cfg.label_smoothing)
    tx = make_optimizer(ocfg)

    ckpts = None if cfg.eval_only and cfg.init_from else Checkpoints(cfg.workdir, cfg.keep_checkpoints)
    resuming = ckpts is not None and ckpts.latest_step() is not None
    if cfg.resume and not resuming:
        raise RunError(f"--resume: no checkpoint in {cfg.workdir / 'checkpoints'}; drop --resume to start afresh")
    if resuming and not cfg.eval_only:  # evaluating may use another batch size; it changes nothing
        check_same_run(cfg)
    model = rebuild_model(cfg) if resuming else build_model(cfg, splits.num_classes)
    model_config = model.config
    graphdef, state = create_train_state(model, tx, cfg.seed)
    del model
    state = jax.device_put(state, replicated)
    train_fn, eval_fn = jit_steps(graphdef, tx, ocfg, replicated, batch_sharding)

    meta = {"step": 0, "epoch": 0, "batch": 0}
    if resuming:
        step = ckpts.best_step() if cfg.eval_only else ckpts.latest_step()
        state, meta = ckpts.restore(state, step)
        log(f"resumed from {cfg.workdir / 'checkpoints'} at step {meta['step']} "
            f"(epoch {meta['epoch'] + 1}, batch {meta['batch']})")
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(cfg.workdir, enabled=jax.process_index() == 0)
    schedule = [Segment("val")] if cfg.eval_only else run_schedule(
        spe, total_steps, int(meta["step"]), int(meta["epoch"]), int(meta["batch"]), cfg.eval_every_epochs)
    data = RunData(splits, schedule, batch_size=cfg.batch_size, image_size=cfg.image_size, seed=cfg.seed,
                   num_workers=cfg.num_workers, process_index=jax.process_index(), process_count=jax.process_count())
    try:
        if cfg.eval_only:
            result = evaluate(eval_fn, state, data, batch_sharding)
            metrics.write({"step": int(meta["step"]), "epoch": int(meta["epoch"]), **result})
            log(format_eval(result))
            return result
        write_run_file(cfg, model_config, splits.class_names)
        metrics.truncate_after(int(meta["step"]))
        log(f"training {cfg.resolved_arch if not cfg.init_from else 'from ' + str(cfg.init_from)} on "
            f"{len(splits.train)} images ({describe_classes(splits.class_names)}), validating on {len(splits.val)}; "
            f"{jax.device_count()} device(s) on {jax.process_count()} host(s); global batch {cfg.batch_size}, "
            f"{spe} steps/epoch, {total_steps} steps, peak lr {peak_lr:g}")
        return train_loop(cfg, data, state, meta, train_fn, eval_fn, ckpts, metrics, spe, total_steps,
                          batch_sharding)
    finally:
        data.close()
        metrics.close()
        if ckpts is not None:
            ckpts.wait()
            ckpts.close()
        if jax.process_index() == 0 and not cfg.eval_only:
            try:
                plot_curves(cfg.workdir / "metrics.jsonl", cfg.workdir / "curves.png")
            except OSError as e:  # a full or read-only disk: the run's own outcome is what gets reported
                print(f"warning: cannot write {cfg.workdir / 'curves.png'} ({e.strerror or e})", file=sys.stderr)


def format_eval(r: dict[str, float]) -> str:
    if not r:
        return "no validation examples"
    return f"val loss {r['val_loss']:.4f}  top-1 {r['val_top1']:.2f}%  top-5 {r['val_top5']:.2f}%  " \
           f"({r['val_examples']} images)"


def train_loop(cfg, data, state, meta, train_fn, eval_fn, ckpts, metrics, spe, total_steps, batch_sharding):
    step, epoch, start_batch = int(meta["step"]), int(meta["epoch"]), int(meta["batch"])
    num_epochs = math.ceil(total_steps / spe)
    last_eval: dict[str, float] = dict(meta.get("metrics") or {})
    bar = _progress(cfg, total_steps, step)
    pending: list[dict[str, jax.Array]] = []
    skipped = int(meta.get("skipped_images", 0))
    t_last, step_last = time.perf_counter(), step

    def position(epoch_: int, batch_: int) -> dict[str, Any]:
        return {"step": step, "epoch": epoch_, "batch": batch_, "skipped_images": skipped, "metrics": last_eval}

    def flush_metrics(ep: int) -> None:
        nonlocal pending, t_last, step_last
        if not pending:
            return
        host = jax.device_get(pending)
        pending = []
        check_finite(host, step, ckpts)
        loss = float(np.mean([m["train_loss"] for m in host]))
        now = time.perf_counter()
        ips = (step - step_last) * cfg.batch_size / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        record = {"step": step, "epoch": ep + 1, "train_loss": loss, "lr": float(host[-1]["lr"]),
                  "train_top1": 100 * float(np.mean([m["train_top1"] for m in host])),
                  "grad_norm": float(host[-1]["grad_norm"]), "images_per_sec": ips}
        if skipped:
            record["skipped_images"] = skipped
        metrics.write(record)
        if bar is not None:
            bar.update(step - bar.n)  # every pending step has finished (device_get above waited for them)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{ips:.0f}")

    while epoch < num_epochs and step < total_steps:
        batch_idx = start_batch
        for batch, n_bad in prefetch(data.train(epoch, start_batch), batch_sharding):
            state, m = train_fn(state, batch)
            step, batch_idx, skipped = step + 1, batch_idx + 1, skipped + n_bad
            pending.append(m)
            if bar is not None:
                bar.update(finished_steps(step, pending) - bar.n)
            if step % cfg.log_every == 0:
                flush_metrics(epoch)
            if step % cfg.checkpoint_every == 0 and batch_idx < spe and step < total_steps:
                flush_metrics(epoch)  # checks the state about to be saved: never save a non-finite one
                ckpts.save(step, state, position(epoch, batch_idx))
            if step >= total_steps:
                break
        flush_metrics(epoch)
        done = step >= total_steps
        if batch_idx >= spe:  # a whole epoch; otherwise --max-steps stopped it part-way
            epoch, start_batch = epoch + 1, 0
        else:
            start_batch = batch_idx
        if (start_batch == 0 and epoch % cfg.eval_every_epochs == 0) or done:
            last_eval = evaluate(eval_fn, state, data, batch_sharding)
            check_finite_eval(last_eval, step, ckpts)
            if last_eval:
                metrics.write({"step": step, "epoch": epoch + (start_batch > 0), **last_eval})
                log(f"epoch {epoch + (start_batch > 0)}/{num_epochs} step {step}: {format_eval(last_eval)}")
        ckpts.save(step, state, position(epoch, start_batch),
                   metrics={"val_top1": last_eval["val_top1"]} if last_eval else None, force=True)
    if bar is not None:
        bar.close()
    if skipped:
        log(f"skipped {skipped} unreadable training image(s); see the warnings above")
    best = ckpts.best_step()
    log(f"done: {step} steps; checkpoints in {ckpts.directory}" + (f" (best: step {best})" if best else ""))
    return last_eval


def finished_steps(step: int, pending: list[dict[str, jax.Array]]) -> int:
    """Steps whose results are computed: all but the dispatched ones still running (``pending`` is in order)."""
    running = len(pending)
    for m in pending:
        if not m["train_loss"].is_ready():
            break
        running -= 1
    return step - running


def check_finite(host_metrics: list[dict[str, Any]], step: int, ckpts: Checkpoints) -> None:
    """Stop once a step's loss or the state it produced (weights, BN statistics) is NaN or infinite."""
    first = step - len(host_metrics) + 1
    for i, m in enumerate(host_metrics):
        if not bool(m["state_finite"]) or not math.isfinite(float(m["train_loss"])):
            what = "loss" if not math.isfinite(float(m["train_loss"])) else "weights"
            raise NonFiniteLoss(f"the training {what} became non-finite (NaN/inf) at step {first + i}; stopped "
                                f"without saving it. {_kept(ckpts)}; lower --lr or raise --warmup-steps, then "
                                "rerun to resume from it")


def check_finite_eval(result: dict[str, float], step: int, ckpts: Checkpoints) -> None:
    """Stop, without saving, when the validation loss of the state at ``step`` is NaN or infinite."""
    if result and not math.isfinite(result["val_loss"]):
        raise NonFiniteLoss(f"the validation loss became {result['val_loss']} at step {step} (the weights "
                            f"overflow); stopped without saving them. {_kept(ckpts)}; lower --lr or raise "
                            "--warmup-steps, then rerun to resume from it")


def _kept(ckpts: Checkpoints) -> str:
    ckpts.wait()
    last = ckpts.latest_step()
    if last is None:
        return "No checkpoint was saved before"
    return f"The last good checkpoint (step {last}) is kept in {ckpts.directory}"


def describe_classes(names: list[str], limit: int = 20) -> str:
    """``3 classes: a, b, c`` (the first ``limit`` names; run.json holds all)."""
    shown = ", ".join(names[:limit]) + (f", ... (+{len(names) - limit} more in {RUN_FILE})" if len(names) > limit
                                        else "")
    return f"{len(names)} classes: {shown}"


def _progress(cfg: TrainConfig, total: int, initial: int):
    if not cfg.progress or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)
