"""The training run, top to bottom: data, mesh, model, state and steps, resume, then the loop over steps."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import jax

from train import recipes
from train.augment import Augment
from train.checkpoint import Checkpoints
from train.config import TrainConfig
from train.errors import NonFiniteLoss, Preempted, RunError
from train.evaluate import evaluate, format_eval
from train.mesh import check_batch_size, make_mesh, prefetch
from train.metrics import MetricsLog, TrainLog, plot_curves
from train.model_setup import initial_model, recorded_model
from train.pipeline import RunData, ra_epoch_problem, steps_per_epoch
from train.preemption import PreemptionWatch
from train.progress import Progress, log
from train.run_file import RUN_FILE, check_same_run, describe_changes, flags_of, write_run_file
from train.schedule import Position, Schedule, Segment
from train.sources import load_splits
from train.steps import OptimConfig, build_steps
from train.storage import local_copy


def run(cfg: TrainConfig) -> dict[str, float]:
    """Train (or evaluate with ``cfg.eval_only``); returns the last evaluation's metrics."""
    if cfg.multi_host:
        start_hosts(cfg)
    splits = load_splits(cfg.dataset, cfg.data_dir, str(cfg.tfds_data_dir) if cfg.tfds_data_dir else None,
                         val_fraction=cfg.val_fraction)
    replicated, batch_sharding = make_mesh()
    check_batch_size(cfg.batch_size, batch_sharding)
    replicas = batch_sharding.mesh.size  # repeated augmentation spreads each example's copies over them
    spe = steps_per_epoch(len(splits.train), cfg.batch_size, True, cfg.ra_reps, replicas)
    if spe == 0 and not cfg.eval_only and cfg.ra_reps > 1:
        raise RunError(ra_epoch_problem(len(splits.train), cfg.batch_size, cfg.ra_reps, replicas))
    if spe == 0 and not cfg.eval_only:
        fits = len(splits.train) // jax.device_count() * jax.device_count()
        fix = f"pass --batch-size {fits} or less" if fits else "add training images"
        raise RunError(f"--batch-size {cfg.batch_size} is larger than the {len(splits.train)} training images; {fix}")
    total_steps = cfg.max_steps or cfg.epochs * spe
    optim = OptimConfig.for_run(cfg, total_steps, max(spe, 1))

    # Where the run starts: the workdir's checkpoint when resuming (its position read now, its weights below).
    ckpts = None if cfg.eval_only and cfg.init_from else Checkpoints(cfg.workdir, cfg.keep_checkpoints)
    resuming = ckpts is not None and ckpts.latest_step() is not None
    if cfg.resume and not resuming:
        raise RunError(f"--resume: no checkpoint in {cfg.workdir / 'checkpoints'}; drop --resume to start afresh")
    changed = {}
    if resuming and not cfg.eval_only:  # evaluating may use another batch size; it changes nothing
        changed = check_same_run(cfg, splits.class_names)
    position, restore_step = {"step": 0, "epoch": 0, "batch": 0}, None
    if resuming:
        restore_step = (ckpts.best_step() if cfg.eval_only else None) or ckpts.latest_step()
        position = ckpts.read_meta(restore_step)
    progress = data = metrics = None
    reader = {"batch_size": cfg.batch_size, "seed": cfg.seed, "num_workers": cfg.resolved_num_workers,
              "process_index": jax.process_index(), "process_count": jax.process_count()}
    watch = None if cfg.eval_only else PreemptionWatch()  # SIGTERM from here on: stop after a step, checkpointed
    try:
        # The data first: one reader for every epoch and evaluation of the run, whose workers start now, read
        # ahead across epoch ends, and start up while the model below is built and its steps compiled.
        if cfg.eval_only:
            crop, resize = cfg.val_crop_size or cfg.image_size, cfg.val_resize_size
            if cfg.init_from and (cfg.image_size, cfg.val_crop_size, cfg.val_resize_size) == (
                    TrainConfig.image_size, None, None):  # no size given: the weights' own eval transform
                from resnet_flax.loading import eval_settings

                with local_copy(cfg.init_from) as path:
                    t = eval_settings(path)[1]
                crop, resize = t.crop_size, t.resize_size
                log(f"evaluating as the weights file records: resize {resize}, centre crop {crop}")
            data = RunData(splits, [Segment("val")], image_size=crop, resize_size=resize, **reader)
        else:
            schedule = Schedule(spe, total_steps, cfg.eval_every_epochs, cfg.checkpoint_every)
            start = Position(int(position["step"]), int(position["epoch"]), int(position["batch"]))
            data = RunData(splits, schedule.segments(start), image_size=cfg.image_size,
                           augment=Augment.for_run(cfg), resize_size=cfg.val_resize_size,
                           val_image_size=cfg.val_crop_size, ra_reps=cfg.ra_reps, num_replicas=replicas, **reader)

        # The model: the workdir's own when resuming, else fresh or --init-from; then state and compiled steps.
        model = recorded_model(cfg) if resuming else initial_model(cfg, splits.num_classes)
        model_config = model.config
        state, train_step, eval_step = build_steps(model, optim, replicated, batch_sharding)
        del model
        state = jax.device_put(state, replicated)
        if resuming:
            state, _ = ckpts.restore(state, restore_step, meta=False)  # its position was read above
            log(f"resumed from {cfg.workdir / 'checkpoints'} at step {position['step']} "
                f"(epoch {position['epoch'] + 1}, batch {position['batch']})")
        cfg.workdir.mkdir(parents=True, exist_ok=True)  # only now: a run that fails to start leaves no workdir
        metrics = MetricsLog(cfg.workdir, enabled=jax.process_index() == 0)

        if cfg.eval_only:
            result = evaluate(eval_step, state, data.val(), batch_sharding)
            metrics.write({"step": int(position["step"]), "epoch": int(position["epoch"]), **result})
            log(format_eval(result))
            return result

        if changed:
            log(f"resuming with changed flags (--allow-changed-flags; recorded in {RUN_FILE}): "
                f"{describe_changes(changed)}")
        if jax.process_index() == 0:
            write_run_file(cfg, model_config, splits.class_names, changed, int(position["step"]))
        metrics.truncate_after(int(position["step"]))
        if cfg.recipe is not None:
            log(recipes.summary(cfg.recipe, flags_of(cfg)))
        log(f"training {cfg.resolved_arch if not cfg.init_from else 'from ' + str(cfg.init_from)} on "
            f"{len(splits.train)} images ({describe_classes(splits.class_names)}), validating on {len(splits.val)}; "
            f"{jax.device_count()} device(s) on {jax.process_count()} host(s); global batch {cfg.batch_size}, "
            f"{spe} steps/epoch, {total_steps} steps, peak lr {optim.lr:g}")

        # The loop: the schedule's stretches of steps (to each epoch end and the last step); metrics every
        # --log-every steps, checkpoints every --checkpoint-every steps and after each stretch, evaluations
        # where the schedule puts them (every --eval-every-epochs epochs and at the end).
        step, skipped = start.step, int(position.get("skipped_images", 0))
        last_eval: dict[str, float] = dict(position.get("metrics") or {})
        progress = Progress(total_steps, step, enabled=cfg.progress)
        train_log = TrainLog(metrics, progress, cfg.batch_size, step)
        for stretch in schedule.stretches(start):
            epoch, done = stretch.train.epoch, 0
            for batch, n_bad in prefetch(data.train(epoch, stretch.train.start), batch_sharding):
                state, step_metrics = train_step(state, batch)
                done, skipped = done + 1, skipped + n_bad
                step = stretch.start_step + done
                train_log.add(step_metrics)
                progress.step_queued(step, step_metrics)
                save_now = schedule.checkpoints_within(stretch, step)
                # SIGTERM: the last batch of a stretch is asked after its evaluation and checkpoint, below.
                preempted = done < stretch.num_batches and watch.reached(step)
                if step % cfg.log_every == 0 or save_now or preempted:  # checks the state about to be saved
                    check_finite(train_log.flush(step, epoch, skipped), step, ckpts)
                if save_now or preempted:
                    metrics.sync()  # a URL workdir's metrics.jsonl, as far as this checkpoint
                    ckpts.save(step, state, {**dataclasses.asdict(stretch.position_after(done)),
                                             "skipped_images": skipped, "metrics": last_eval}, force=preempted)
                if preempted:
                    ckpts.wait()
                    raise Preempted(step)
            if done != stretch.num_batches:
                raise RuntimeError(f"the data ended after {done} of the {stretch.num_batches} batches of {stretch}")
            check_finite(train_log.flush(step, epoch, skipped), step, ckpts)
            if stretch.evaluate:
                last_eval = evaluate(eval_step, state, data.val(), batch_sharding)
                check_finite_eval(last_eval, step, ckpts)
                if last_eval:
                    metrics.write({"step": step, "epoch": stretch.reported_epoch, **last_eval})
                    log(f"epoch {stretch.reported_epoch}/{schedule.num_epochs} step {step}: {format_eval(last_eval)}")
            metrics.sync()
            ckpts.save(step, state, {**dataclasses.asdict(stretch.end), "skipped_images": skipped,
                                     "metrics": last_eval},
                       metrics={"val_top1": last_eval["val_top1"]} if last_eval else None, force=True)
            if step < total_steps and watch.reached(step):
                ckpts.wait()
                raise Preempted(step)
        progress.close()
        if skipped:
            log(f"skipped {skipped} unreadable training image(s); see the warnings above")
        best = ckpts.best_step()
        log(f"done: {step} steps; checkpoints in {ckpts.directory}" + (f" (best: step {best})" if best else ""))
        return last_eval
    finally:
        if watch is not None:
            watch.close()
        if data is not None:
            data.close()
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        if ckpts is not None:
            ckpts.wait()
            ckpts.close()
        if metrics is not None and jax.process_index() == 0 and not cfg.eval_only:
            try:
                plot_curves(cfg.workdir / "metrics.jsonl", cfg.workdir / "curves.png")
            except OSError as e:  # a full or read-only disk: the run's own outcome is what gets reported
                print(f"warning: cannot write {cfg.workdir / 'curves.png'} ({e.strerror or e})", file=sys.stderr)


def start_hosts(cfg: TrainConfig) -> None:
    """Join the run's other processes: found by JAX on TPU pods and SLURM/Kubernetes, or named by the flags.

    CPU processes exchange their collectives through Gloo (JAX's CPU default has no cross-process transport)."""
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                               process_id=cfg.process_id, heartbeat_timeout_seconds=cfg.host_timeout)


def check_finite(host_metrics: list[dict[str, Any]], step: int, ckpts: Checkpoints) -> None:
    """Stop once a step's loss or the state it produced (weights, BN statistics) is NaN or infinite."""
    first = step - len(host_metrics) + 1
    for i, m in enumerate(host_metrics):
        loss_finite = math.isfinite(float(m["train_loss"]))
        if not bool(m["state_finite"]) or not loss_finite:
            bad = first + i
            # A non-finite loss at step s came from the weights after step s-1: a checkpoint of those is no good.
            removed = ckpts.discard_from(bad if loss_finite else bad - 1)
            what = "weights" if loss_finite else "loss"
            gone = f" The checkpoint of step {removed[0]}, whose weights gave it, was removed." if removed else ""
            raise NonFiniteLoss(f"the training {what} became non-finite (NaN/inf) at step {bad}; stopped "
                                f"without saving it.{gone} {_kept(ckpts)}; lower --lr or raise --warmup-steps, "
                                "then rerun to resume from it")


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
