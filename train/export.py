"""``python -m train.export WORKDIR OUT.flax.safetensors [--ema]``: a run's best checkpoint as a converted weights
file (class names and evaluation transform recorded), the model's weights or, with ``--ema``, their EMA's."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resnet_flax.errors import WeightsError
from resnet_flax.weights import EvalTransform, WeightsInfo
from train.errors import CheckpointError
from train.storage import AnyPath, StorageError, as_path


def export(workdir: AnyPath, out: str | Path, ema: bool = False, overwrite: bool = False) -> Path:
    """Write the best (else latest) checkpoint of ``workdir`` to ``out``: its EMA weights with ``ema`` (timm's
    ``state_dict_ema``), recording the run's class names, evaluation transform and which weights they are."""
    from resnet_flax.io import save
    from train.predict import load_from_workdir
    from train.transforms import default_resize_size

    model, names, size = load_from_workdir(as_path(workdir), ema)
    transform = size if isinstance(size, EvalTransform) else EvalTransform(size, default_resize_size(size))
    info = WeightsInfo(class_names=names, transform=transform, source=str(workdir),
                       weights_set="ema" if ema else "model")
    return save(model, out, info.to_metadata(), exclusive=not overwrite)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", help="a training --workdir (a path or a URL)")
    p.add_argument("out", type=Path, help="the .flax.safetensors file to write")
    p.add_argument("--ema", action="store_true", help="write the EMA of the weights (a run with --model-ema)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    try:
        workdir = as_path(args.workdir)
        if not workdir.is_dir():
            raise CheckpointError(f"{workdir}: no such workdir; pass the --workdir of a run")
        path = export(workdir, args.out, args.ema, args.overwrite)
    except (CheckpointError, WeightsError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.out} ({e.strerror or e}); free space or fix permissions", file=sys.stderr)
        return 2
    print(f"wrote {path} ({'EMA' if args.ema else 'model'} weights of {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
