"""``python -m train.predict photo.jpg --checkpoint WORKDIR``: top-5 classes with names and probabilities."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet_flax.io import WeightsError, first_line
from resnet_flax.model import ResNet, ResNetConfig
from train.errors import DataError
from train.run_file import RUN_FILE

IMAGENET_CLASSES = Path(__file__).with_name("imagenet_classes.txt")


def imagenet_class_names() -> list[str]:
    return IMAGENET_CLASSES.read_text().splitlines()


def load_from_workdir(workdir: Path) -> tuple[ResNet, list[str], int]:
    """The best (else latest) checkpoint of a training workdir, its class names and image size."""
    from train.checkpoint import Checkpoints
    from train.run_file import read_run_file
    from train.steps import OptimConfig, create_train_state, make_optimizer

    run = read_run_file(workdir)
    config = ResNetConfig.from_dict(run["model"])
    tx = make_optimizer(OptimConfig(total_steps=1, optimizer=run["flags"]["optimizer"]))  # its state's structure
    graphdef, target = nnx.eval_shape(lambda: create_train_state(ResNet(config, rngs=nnx.Rngs(0)), tx))
    ckpts = Checkpoints(workdir, async_save=False)
    step = ckpts.best_step() or ckpts.latest_step()
    if step is None:
        raise WeightsError(f"{workdir}: no checkpoint yet; train first or pass a weights file")
    state, _ = ckpts.restore(target, step)
    ckpts.close()
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    model.eval()
    return model, run["class_names"], int(run["flags"]["image_size"])


def load_predictor(checkpoint: Path) -> tuple[ResNet, list[str], int]:
    """(model, class names, image size) from a workdir, a converted file or a PyTorch checkpoint."""
    if checkpoint.is_dir():
        if not (checkpoint / RUN_FILE).exists():
            raise WeightsError(f"{checkpoint}: not a training workdir (no run.json); pass the --workdir of a run")
        return load_from_workdir(checkpoint)
    import convert

    model = convert.load_model(checkpoint)
    n = model.config.num_classes
    names = imagenet_class_names() if n == 1000 else [f"class {i}" for i in range(n)]
    return model, names, 224


def predict(model: ResNet, images: list[Path], image_size: int) -> np.ndarray:
    """Softmax probabilities for each image file, with torchvision's evaluation transform."""
    from train.transforms import eval_transform, load_image

    batch = []
    for path in images:
        try:
            batch.append(eval_transform(load_image(path), image_size))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the image ({first_line(e)}); pass a JPEG/PNG file") from None
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(np.stack(batch)))
    return np.asarray(jax.nn.softmax(logits, axis=-1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.predict",
                                description="Print the top classes of images with a trained or converted model.")
    p.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, ...)")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a training --workdir (best checkpoint), a .flax.safetensors or a PyTorch checkpoint "
                        "(1000 classes: ImageNet names)")
    p.add_argument("--top-k", type=int, default=5, help="how many classes to print")
    p.add_argument("--image-size", type=int, help="crop size (default: the run's, or 224)")
    args = p.parse_args(argv)
    try:
        for path in args.images:
            if not path.is_file():
                raise DataError(f"{path}: no such image file")
        if not args.checkpoint.exists():
            raise WeightsError(f"{args.checkpoint}: no such workdir or weights file")
        model, names, size = load_predictor(args.checkpoint)
        probs = predict(model, args.images, args.image_size or size)
    except (DataError, WeightsError) as e:
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
