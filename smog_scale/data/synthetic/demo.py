"""A small labelled image set made only from images that ship in installable packages: no download.

``python -m smog_scale.data.synthetic.demo OUT_DIR`` writes ``OUT_DIR/train/<class>/*.JPEG`` and a held-out
``OUT_DIR/val/<class>/*.JPEG`` (with ``--flat-val``: ``OUT_DIR/val/*.JPEG`` plus
``OUT_DIR/LOC_val_solution.csv``, the way ImageNet's validation set comes). Ten classes, JPEGs with
a longer side of 160-400 px, a few seconds to write, identical for the same seed:

- four photos from ``skimage.data`` (astronaut, chelsea, coffee, rocket), seen as random crops
  (25-100% of the area), flips, rotations of up to 15 degrees and colour shifts;
- three grey textures from ``skimage.data`` (brick, grass, gravel), tinted a random colour per
  image and varied the same way, so that texture and not colour tells them apart;
- three handwritten digits from scikit-learn (3, 5, 8: the ones most alike), upscaled and drawn in
  random colours, sizes, places and angles on a gradient; train and val use disjoint handwritings.

Needs scikit-image and scikit-learn (``pip install -e .[test]``).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
TEXTURES = ("brick", "grass", "gravel")
DIGITS = (3, 5, 8)
SIDE_RANGE = (160, 400)  # longer side of every image, in pixels
JPEG_QUALITY = 90
SPLITS = ("train", "val")

Render = Callable[[np.random.Generator, int], Image.Image]  # (rng, sample index in its split) -> image


@dataclass(frozen=True)
class DemoSummary:
    """What ``write_demo`` wrote: class names in sorted order and image counts per split."""

    root: Path
    classes: list[str]
    counts: dict[str, int]


def class_names() -> list[str]:
    """The ten class names, sorted (the converter indexes classes in this order)."""
    return sorted([*PHOTOS, *TEXTURES, *(f"digit_{d}" for d in DIGITS)])


def _longer_side(rng: np.random.Generator) -> int:
    return int(rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1))


def _shift_colours(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation in 0.7-1.3 and per-channel gains in 0.85-1.15."""
    pixels = np.asarray(image, dtype=np.float32)
    mean = pixels.mean()
    pixels = (pixels - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.7, 1.3)
    grey = pixels.mean(axis=2, keepdims=True)
    pixels = grey + (pixels - grey) * rng.uniform(0.7, 1.3)
    pixels *= rng.uniform(0.85, 1.15, size=3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _random_view(picture: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random resized crop (area 25-100%, aspect 3/4-4/3), rotated, maybe flipped, colour-shifted."""
    width, height = picture.size
    area = rng.uniform(0.25, 1.0) * width * height
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_w = min(width, round(math.sqrt(area * aspect)))
    crop_h = min(height, round(math.sqrt(area / aspect)))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    view = picture.crop((left, top, left + crop_w, top + crop_h))
    fill = view.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
    view = view.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR, fillcolor=fill)
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = _longer_side(rng) / max(crop_w, crop_h)
    view = view.resize((max(1, round(crop_w * scale)), max(1, round(crop_h * scale))), Image.Resampling.BICUBIC)
    return _shift_colours(view, rng)


def _photo_renderer(photo: np.ndarray) -> Render:
    picture = Image.fromarray(photo)
    return lambda rng, index: _random_view(picture, rng)


def _texture_renderer(texture: np.ndarray) -> Render:
    def render(rng: np.random.Generator, index: int) -> Image.Image:
        tint = rng.uniform(0.35, 1.0, size=3) * 255
        tinted = texture[..., None].astype(np.float32) / 255 * tint + rng.uniform(0, 60, size=3)
        return _random_view(Image.fromarray(np.clip(tinted, 0, 255).astype(np.uint8)), rng)

    return render


def _digit_renderer(glyphs: np.ndarray) -> Render:
    """Draw ``glyphs[index % len(glyphs)]`` (8x8, values 0-16) as a coloured digit on a gradient."""

    def render(rng: np.random.Generator, index: int) -> Image.Image:
        long_side = _longer_side(rng)
        short_side = round(long_side * rng.uniform(0.75, 1.0))
        width, height = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
        dark = rng.random() < 0.5
        low, high = ((0, 100), (150, 255)) if dark else ((150, 255), (0, 100))
        horizontal = rng.random() < 0.5
        ramp = np.linspace(0, 1, width if horizontal else height, dtype=np.float32)
        ramp = ramp[None, :, None] if horizontal else ramp[:, None, None]
        start, end = rng.uniform(*low, size=3), rng.uniform(*low, size=3)
        canvas = np.broadcast_to(start + (end - start) * ramp, (height, width, 3))
        canvas = canvas + rng.standard_normal((height, width, 3), dtype=np.float32) * 6
        image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        size = round(min(width, height) * rng.uniform(0.4, 0.7))  # at most 0.9 of the side once rotated
        glyph = Image.fromarray((glyphs[index % len(glyphs)] * (255 / 16)).astype(np.uint8))
        glyph = glyph.resize((size, size), Image.Resampling.BICUBIC)
        glyph = glyph.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BILINEAR, expand=True)
        ink = Image.new("RGB", glyph.size, tuple(int(c) for c in rng.uniform(*high, size=3)))
        left = int(rng.integers(0, width - glyph.width + 1))
        top = int(rng.integers(0, height - glyph.height + 1))
        image.paste(ink, (left, top), glyph)
        return image

    return render


def _renderers() -> dict[str, dict[str, Render]]:
    """Split -> class name -> renderer; digits draw from a 4:1 train:val partition of each digit's samples."""
    try:
        import skimage.data
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the demo data set needs scikit-image and scikit-learn: pip install -e .[test]") from exc
    shared = {name: _photo_renderer(getattr(skimage.data, name)()) for name in PHOTOS}
    shared |= {name: _texture_renderer(getattr(skimage.data, name)()) for name in TEXTURES}
    digits = load_digits()
    by_split = {split: dict(shared) for split in SPLITS}
    for digit in DIGITS:
        glyphs = digits.images[digits.target == digit]
        cut = len(glyphs) * 4 // 5
        by_split["train"][f"digit_{digit}"] = _digit_renderer(glyphs[:cut])
        by_split["val"][f"digit_{digit}"] = _digit_renderer(glyphs[cut:])
    return by_split


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=JPEG_QUALITY)


def write_demo(
    out_dir: Path, train_per_class: int = 32, val_per_class: int = 8, seed: int = 0, flat_val: bool = False
) -> DemoSummary:
    """Write the demo set under ``out_dir`` (see the module docstring); refuse to write over a split."""
    out_dir = Path(out_dir)
    for split in SPLITS:
        if (out_dir / split).exists():
            raise FileExistsError(f"{out_dir / split} exists; remove it or choose another folder")
    classes = class_names()
    renderers = _renderers()
    flat_labels: list[tuple[str, Image.Image]] = []
    for split_index, (split, per_class) in enumerate(zip(SPLITS, (train_per_class, val_per_class), strict=True)):
        for class_index, name in enumerate(classes):
            rng = np.random.default_rng([seed, split_index, class_index])
            for i in range(per_class):
                image = renderers[split][name](rng, i)
                if split == "val" and flat_val:
                    flat_labels.append((name, image))
                else:
                    _save(image, out_dir / split / name / f"{name}_{i:04d}.JPEG")
    if flat_val:
        _write_flat_val(out_dir, flat_labels, np.random.default_rng([seed, len(SPLITS)]))
    counts = {"train": train_per_class * len(classes), "val": val_per_class * len(classes)}
    return DemoSummary(out_dir, classes, counts)


def _write_flat_val(out_dir: Path, labelled: list[tuple[str, Image.Image]], rng: np.random.Generator) -> None:
    """ImageNet's validation layout: shuffled ``val/demo_val_00000001.JPEG`` and ``LOC_val_solution.csv``."""
    rows = []
    for number, position in enumerate(rng.permutation(len(labelled)), start=1):
        name, image = labelled[position]
        image_id = f"demo_val_{number:08d}"
        _save(image, out_dir / "val" / f"{image_id}.JPEG")
        rows.append((image_id, f"{name} 0 0 {image.width - 1} {image.height - 1}"))
    with open(out_dir / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(sorted(rows))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m smog_scale.data.synthetic.demo OUT_DIR [--train-per-class N] [--val-per-class N] [--seed S]``."""
    parser = argparse.ArgumentParser(prog="python -m smog_scale.data.synthetic.demo",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="gets train/ and val/")
    parser.add_argument("--train-per-class", type=int, default=32, metavar="N", help="default: 32")
    parser.add_argument("--val-per-class", type=int, default=8, metavar="N", help="default: 8")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="default: 0")
    parser.add_argument(
        "--flat-val", action="store_true", help="write val/ as ImageNet's flat folder plus LOC_val_solution.csv"
    )
    args = parser.parse_args(argv)
    try:
        summary = write_demo(args.out_dir, args.train_per_class, args.val_per_class, args.seed, args.flat_val)
    except FileExistsError as exc:
        parser.error(str(exc))
    print(f"wrote {summary.counts} images of {len(summary.classes)} classes to {summary.root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
