"""Command line: convert a PyTorch ResNet checkpoint to Flax, or a converted file back to PyTorch."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2
VERIFY_TOLERANCE = 1e-4  # relative; float32 parity is ~1e-6 (docs/parity.md), a mapping error is >1e-2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line (not argparse's usage block), exit 2, like every other refusal."""
        self.exit(EXIT_BAD_INPUT, f"error: {message}; see python -m convert --help\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from resnet_flax.registry import ARCHS

    p = _Parser(
        prog="python -m convert",
        description="Convert a torchvision-style or timm ResNet checkpoint (.pth/.pt saved with torch.save, a "
                    "TorchScript archive, or .safetensors) into a resnet_flax weights file, or a converted "
                    ".flax.safetensors file back into a PyTorch state dict. The architecture is read off the tensors.",
    )
    p.add_argument("src", type=Path, help="checkpoint to convert")
    p.add_argument("--out", type=Path, help="output path (default: next to SRC, as NAME.flax.safetensors, "
                                             "or NAME.pth when converting back)")
    p.add_argument("--arch", choices=list(ARCHS), metavar="NAME",
                   help="expected architecture, checked against the tensors: " + ", ".join(ARCHS))
    p.add_argument("--dilation", metavar="B,B,B",
                   help="replace_stride_with_dilation for layer2..4 as 0/1 flags (not visible in the weights; "
                        "default 0,0,0, or 0,1,1 for torchvision segmentation models)")
    p.add_argument("--prefix", metavar="PREFIX",
                   help="the ResNet to take from a file holding several (e.g. 'encoder.'); by default the one "
                        "complete ResNet the file holds, found by its structure")
    p.add_argument("--weights-set", choices=["auto", "ema", "model"], default="auto",
                   help="for checkpoints holding model and EMA weights (timm training): auto takes the EMA "
                        "weights, as timm's load_checkpoint does")
    p.add_argument("--verify", action="store_true",
                   help="run torchvision (timm for ResNet-D/T and SE models) and the Flax model on one random batch "
                        "and print the max difference")
    p.add_argument("--verify-size", type=int, default=224, metavar="PX", help="image size for --verify")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert a checkpoint holding NaN/inf values (refused by default: such a model outputs NaN)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from resnet_flax.errors import WeightsError

    try:
        dilation = None if args.dilation is None else tuple(bool(int(f)) for f in args.dilation.split(","))
        if dilation is not None and len(dilation) != 3:
            raise ValueError
    except ValueError:
        print(f"error: --dilation {args.dilation!r}: give three 0/1 flags, e.g. 0,1,1", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not 16 <= args.verify_size <= 1024:
        print(f"error: --verify-size {args.verify_size}: give an image size from 16 to 1024 pixels", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return run(args, dilation)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # unreadable source, read-only or full output folder: nothing was left behind
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; check the path, its permissions and the free disk space",
              file=sys.stderr)
        return EXIT_BAD_INPUT


def run(args: argparse.Namespace, dilation: tuple[bool, bool, bool] | None) -> int:
    import resnet_flax
    from convert.verify import compare_outputs, require_reference, require_torch, save_torch
    from resnet_flax.errors import WeightsError
    from resnet_flax.loading import build_model, check_arch, default_output, describe, read_checkpoint, save_converted
    from resnet_flax.reader import detect_format, weights_file

    src: Path = args.src
    to_flax = src.is_dir() or detect_format(weights_file(src)) != "flax"  # a folder: a Hugging Face hub folder
    if not to_flax:
        require_torch("writing a PyTorch state dict")
    if args.verify:
        require_torch("--verify (it runs torchvision)")
    out = args.out or default_output(src, to_flax)
    if out.resolve() == src.resolve():
        raise WeightsError(f"{out}: the output would overwrite the input; pass another --out")
    if any(parent.exists() and not parent.is_dir() for parent in out.parents):
        raise WeightsError(f"{out}: a file stands where a folder of that path should be; pass another --out")
    if out.is_dir():
        raise WeightsError(f"{out} is a folder; pass a file path as --out")
    if out.exists() and not args.overwrite:
        raise WeightsError(f"{out} exists; pass --overwrite to replace it or --out for another path")

    t0 = time.perf_counter()
    if not to_flax:
        model = resnet_flax.load(src)
        check_arch(model.config, args.arch)
        save_torch(model, out, exclusive=not args.overwrite)
        print(f"found {describe(model.config)} in {src}")
        print(f"wrote PyTorch state dict {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
        return 0

    ckpt = read_checkpoint(src, arch=args.arch, replace_stride_with_dilation=dilation,
                           allow_nonfinite=args.allow_nonfinite, weights_set=args.weights_set, prefix=args.prefix)
    model = build_model(ckpt)
    for note in ckpt.notes:
        print(f"note: {note}")
    print(f"found {describe(ckpt.config)}, {ckpt.num_params / 1e6:.2f}M parameters, in {src}")
    if args.verify:  # before writing: a conversion that does not match leaves no file behind
        require_reference(ckpt.config)
        abs_err, rel_err = compare_outputs(ckpt, model, size=args.verify_size)
        ok = rel_err <= VERIFY_TOLERANCE
        print(f"verify ({args.verify_size}x{args.verify_size}, batch 2, eval mode): max abs diff {abs_err:.3g}, "
              f"max rel diff {rel_err:.3g} -> {'OK' if ok else 'MISMATCH'}")
        if not ok:
            print(f"error: outputs differ by more than {VERIFY_TOLERANCE:g} (relative); nothing written",
                  file=sys.stderr)
            return 1
    save_converted(ckpt, model, src, out, exclusive=not args.overwrite)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
