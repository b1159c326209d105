"""Write a small 5-class image folder (circle, square, triangle, cross, stripes) for offline demos.

Shapes have random colours, sizes, positions and noisy backgrounds, so colour is no cue: a model has to
learn shape. Usage: ``python examples/make_shapes_dataset.py DIR --per-class 120``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "cross", "stripes")


def draw(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    bg = rng.integers(0, 256, 3)
    img = np.clip(bg + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    fg = tuple(int(v) for v in (bg + 128 + rng.integers(-60, 60, 3)) % 256)
    r = rng.uniform(0.2, 0.4) * size
    cx, cy = rng.uniform(r, size - r, 2)
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif kind == "cross":
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    else:
        step = int(rng.integers(6, 14))
        for x in range(0, size, 2 * step):
            d.rectangle([x, 0, x + step - 1, size], fill=fg)
    angle = float(rng.uniform(0, 360)) if kind != "stripes" else float(rng.uniform(-30, 30))
    return im.rotate(angle, fillcolor=tuple(int(v) for v in bg))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--per-class", type=int, default=120)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    for kind in CLASSES:
        (args.out / kind).mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            draw(kind, rng, args.size).save(args.out / kind / f"{i:04d}.jpg", quality=92)
    print(f"wrote {len(CLASSES) * args.per_class} images to {args.out}")


if __name__ == "__main__":
    main()
