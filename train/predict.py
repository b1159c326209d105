"""``python -m train.predict photo.jpg --checkpoint WORKDIR``: top-5 classes with names and probabilities."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from resnet_flax.errors import WeightsError, first_line
from resnet_flax.fuse import inference_fn
from resnet_flax.model import ResNet, ResNetConfig
from resnet_flax.weights import EvalTransform
from train import compile_cache
from train.errors import CheckpointError, DataError
from train.host_memory import retain_freed_memory
from train.platforms import leave_out_absent_tpu
from train.run_file import RUN_FILE
from train.storage import AnyPath, StorageError, as_path, local_copy


def load_from_workdir(workdir: AnyPath, ema: bool = False) -> tuple[ResNet, list[str], int | EvalTransform]:
    """The best (else latest) checkpoint of a training workdir (its EMA weights with ``ema``), its class names and
    evaluation transform (its image size, or its --val-resize-size / --val-crop-size)."""
    from train.checkpoint import Checkpoints
    from train.run_file import read_run_file
    from train.steps import OptimConfig, create_train_state, make_optimizer

    try:
        run = read_run_file(workdir)
        config = ResNetConfig.from_dict(run["model"])
        tx = make_optimizer(OptimConfig(total_steps=1, optimizer=run["flags"]["optimizer"]))  # its state's structure
        names, size = [str(n) for n in run["class_names"]], int(run["flags"]["image_size"])
        crop, resize = run["flags"].get("val_crop_size"), run["flags"].get("val_resize_size")
        if crop or resize:
            from train.transforms import default_resize_size

            size = EvalTransform(int(crop or size), int(resize or default_resize_size(int(crop or size))))
        has_ema = bool(run["flags"].get("model_ema", False))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{workdir / RUN_FILE} is unreadable or damaged ({type(e).__name__}: {e}); "
                           "pass the --workdir of a complete run") from None
    if len(names) != config.num_classes:
        raise CheckpointError(f"{workdir / RUN_FILE} names {len(names)} classes for a {config.num_classes}-class "
                           "model (damaged?); pass the --workdir of a complete run")
    if ema and not has_ema:
        raise CheckpointError(f"{workdir}: the run kept no EMA of its weights (trained without --model-ema); drop "
                              "--ema")
    graphdef, target = nnx.eval_shape(lambda: create_train_state(ResNet(config, rngs=nnx.Rngs(0)), tx, has_ema))
    ckpts = Checkpoints(workdir, async_save=False)
    step = ckpts.best_step() or ckpts.latest_step()
    if step is None:
        raise CheckpointError(f"{workdir}: no checkpoint yet; train first or pass a weights file")
    state, _ = ckpts.restore(target, step)
    ckpts.close()
    weights = state.ema if ema else state
    model = nnx.merge(graphdef, weights.params, weights.batch_stats)
    model.eval()
    return model, names, size


def load_predictor(checkpoint: AnyPath, ema: bool = False) -> tuple[ResNet, list[str], int | EvalTransform]:
    """(model, class names, image size or the eval transform the file records) from a workdir (its EMA weights
    with ``ema``), a converted file or a PyTorch checkpoint, each a local path or a URL."""
    if checkpoint.is_dir() and not (checkpoint / "config.json").exists():
        if not (checkpoint / RUN_FILE).exists():
            raise CheckpointError(f"{checkpoint}: not a training workdir (no run.json); pass the --workdir of a run")
        return load_from_workdir(checkpoint, ema)
    if ema:
        raise CheckpointError(f"{checkpoint}: --ema takes a training --workdir; a weights file holds one set of "
                              "weights (convert a timm checkpoint with --weights-set ema for its EMA)")
    from resnet_flax.loading import load_with_info

    with local_copy(checkpoint) as path:
        model, info = load_with_info(path)
    names, transform = info.eval_settings(model.config.num_classes)
    return model, names, transform


def predict(model: ResNet, images: list[Path], image_size: int | EvalTransform) -> np.ndarray:
    """Softmax probabilities for each image file, with torchvision's evaluation transform (or the given one)."""
    from train.transforms import eval_transform, load_image

    t = image_size if isinstance(image_size, EvalTransform) else None
    kw = {"interpolation": t.interpolation, "mean": t.mean, "std": t.std} if t else {}
    batch = []
    for path in images:
        try:
            batch.append(eval_transform(load_image(path), t.crop_size if t else image_size,
                                        t.resize_size if t else None, **kw))
        except Image.DecompressionBombError as e:
            raise DataError(f"{path}: refused, the image is too large to decode safely ({first_line(e)}); "
                            "pass a smaller image") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{path}: cannot read the image ({first_line(e)}); pass a JPEG/PNG file") from None
    logits = inference_fn(model)(jnp.asarray(np.stack(batch)))
    probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
    if not np.all(np.isfinite(probs)):
        raise WeightsError("the model's outputs are not finite (NaN/inf): its weights are broken or overflow; "
                           "use another checkpoint (an earlier step of the run) or weights file")
    return probs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.predict",
                                description="Print the top classes of images with a trained or converted model.")
    p.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, ...)")
    p.add_argument("--checkpoint", required=True,
                   help="a training --workdir (best checkpoint), a .flax.safetensors or a PyTorch checkpoint; a "
                        "path or a URL (gs://...) "
                        "(class names and eval transform as the file records them; else ImageNet's for 1000 classes)")
    p.add_argument("--top-k", type=int, default=5, help="how many classes to print")
    p.add_argument("--image-size", type=int, help="crop size (default: the run's, the one the weights file "
                                                  "records, or 224)")
    p.add_argument("--ema", action="store_true", help="use a workdir's EMA of the weights (a run with --model-ema), "
                                                      "as timm's use_ema")
    p.add_argument("--compile-cache", metavar="DIR", help="where compiled programs are kept (default: as for "
                                                           "python -m train); 'off' to compile from scratch")
    args = p.parse_args(argv)
    if args.top_k < 1:
        print(f"error: --top-k {args.top_k}: give at least 1 (how many classes to print for each image)",
              file=sys.stderr)
        return 2
    try:
        args.checkpoint = as_path(args.checkpoint)
    except StorageError as e:
        print(f"error: --checkpoint {e}", file=sys.stderr)
        return 2
    leave_out_absent_tpu()
    retain_freed_memory()
    compile_cache.enable(args.compile_cache)
    try:
        for path in args.images:
            if not path.is_file():
                raise DataError(f"{path}: no such image file")
        if not args.checkpoint.exists():
            raise WeightsError(f"{args.checkpoint}: no such workdir or weights file")
        model, names, size = load_predictor(args.checkpoint, args.ema)
        probs = predict(model, args.images, args.image_size or size)
    except (CheckpointError, DataError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    k = min(args.top_k, probs.shape[-1])
    for path, p_ in zip(args.images, probs):
        print(path)
        for rank, i in enumerate(np.argsort(-p_)[:k], 1):
            print(f"  {rank}. {names[i]:<30s} {100 * p_[i]:6.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
