"""32-px digits whose nuisances are the augmentations' own: a small labelled set to check that a method learns.

``python -m smog_scale.data.synthetic.digits32 OUT_DIR`` writes ``OUT_DIR/images/{train,val}/digit_<d>/*.jpg``
(an ImageFolder) and converts both splits with the project's converter into ``OUT_DIR/shards/train``
and ``OUT_DIR/shards/val`` (the val shards index classes by the train shards' ``classes.txt``).
Nothing is downloaded; a few seconds to write; identical bytes for the same seed.

Every one of scikit-learn's 1,797 handwritten digits (10 classes, 8x8 glyphs) is drawn once, so
train (1,437) and val (360, a stratified 20%) never share a handwriting. Each image is ``size``
(32) px square: the digit, upscaled to 55-90% of the side, rotated by up to 20 degrees and pasted at a
random place in light ink on a dark flat background (one palette, each colour scaled by a few percent),
then the whole image gets one colour jitter drawn from the small-data training augmentation's own
distribution (brightness, contrast and saturation factors in [0.6, 1.4], hue shift in [-0.1, 0.1], in a
random order: torchvision's ``ColorJitter(0.4, 0.4, 0.4, 0.1)``).

Why this shape (benchmarks/README.md, "Learning on small data"): the nuisance between two images is the
nuisance between two augmented views of one image. Random-init features are sensitive to colour, so their kNN
is poor (about 40% top-1, against 58% for the same digits without the jitter), while an augmentation-invariant
representation can discard it; and no per-image signature survives the augmentations, so instance methods cannot
solve their pretext task by matching colours or backgrounds (the previous version of this set, with per-image
tints, photo backgrounds and ink colours, failed the positive control: the public lightly SimCLR gained nothing
on it in 750 steps).
Needs scikit-learn (``pip install -e .[test]``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torchvision.transforms.v2.functional as TF
from PIL import Image

from smog_scale.data.converter.make_shards import ConvertOptions, convert

SPLITS = ("train", "val")
VAL_FRACTION = 0.2  # 1,797 digits -> 1,437 train + 360 val
GLYPH_RANGE = (0.55, 0.9)  # digit side before rotation, as a fraction of the image side
MAX_ROTATION = 20.0  # degrees
BACKGROUND, INK = (30.0, 40.0, 75.0), (235.0, 205.0, 120.0)  # the palette: light ink on a dark blue
BACKGROUND_SCALE, INK_SCALE = (0.8, 1.2), (0.85, 1.0)  # per-image factors on the palette's colours
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue: recipes/small_32px.yaml's crops
JPEG_QUALITY = 95  # the converter's own re-encoding quality; 4:4:4 chroma keeps 32-px colours sharp
SAMPLES_PER_SHARD = 256


@dataclass(frozen=True)
class Digits32Summary:
    """What ``write_digits32`` wrote: the image and shard folders, class names and images per split."""

    images: Path
    shards: Path
    classes: list[str]
    counts: dict[str, int]


def class_names() -> list[str]:
    """``digit_0`` ... ``digit_9`` (sorted: the converter indexes classes in this order)."""
    return [f"digit_{d}" for d in range(10)]


def split_indices(targets: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Stratified split of sample indices [N]: ceil(``VAL_FRACTION`` x N) to val, spread over the classes
    in proportion to their sizes (each class's members in a seeded random order); sorted, disjoint."""
    order = np.random.default_rng([seed, 1]).permutation(len(targets))
    classes, inverse, sizes = np.unique(targets[order], return_inverse=True, return_counts=True)
    rank = np.zeros(len(order))
    for c in range(len(classes)):  # position of each sample among its class's members, as a fraction
        members = np.flatnonzero(inverse == c)
        rank[members] = (np.arange(len(members)) + 0.5) / sizes[c]
    val_index = np.sort(order[np.argsort(rank, kind="stable")[: math.ceil(len(targets) * VAL_FRACTION)]])
    return {"train": np.setdiff1d(np.arange(len(targets)), val_index), "val": val_index}


def render_digit(glyph: np.ndarray, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One ``size``-px RGB image of ``glyph`` (8x8, values 0-16): light ink on a dark background, then one
    colour jitter of the training augmentation's distribution (module docstring)."""
    background = tuple(int(c * rng.uniform(*BACKGROUND_SCALE)) for c in BACKGROUND)
    image = Image.new("RGB", (size, size), background)
    side = max(4, round(size * rng.uniform(*GLYPH_RANGE)))
    mask = Image.fromarray((glyph * (255 / 16)).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    mask = mask.rotate(rng.uniform(-MAX_ROTATION, MAX_ROTATION), resample=Image.Resampling.BILINEAR, expand=True)
    mask = mask.crop(mask.getbbox() or (0, 0, *mask.size))  # ink only: the glyph can reach the borders
    if max(mask.size) > size:
        mask.thumbnail((size, size), Image.Resampling.BILINEAR)
    ink = Image.new("RGB", mask.size, tuple(int(c * rng.uniform(*INK_SCALE)) for c in INK))
    left = int(rng.integers(0, size - mask.width + 1))
    top = int(rng.integers(0, size - mask.height + 1))
    image.paste(ink, (left, top), mask)
    return jitter_colours(image, rng)


def jitter_colours(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """``ColorJitter(*JITTER)`` with ``rng``: the four factors drawn as torchvision draws them, applied in a
    random order."""
    brightness, contrast, saturation, hue = JITTER
    ops = [(TF.adjust_brightness, rng.uniform(1 - brightness, 1 + brightness)),
           (TF.adjust_contrast, rng.uniform(1 - contrast, 1 + contrast)),
           (TF.adjust_saturation, rng.uniform(1 - saturation, 1 + saturation)),
           (TF.adjust_hue, rng.uniform(-hue, hue))]
    for index in rng.permutation(len(ops)):
        op, factor = ops[index]
        image = op(image, factor)
    return image


def write_images(out_dir: Path, seed: int = 0, size: int = 32) -> dict[str, int]:
    """Write the ImageFolder ``out_dir/{train,val}/digit_<d>/*.jpg``; refuse to write over a split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the digits32 set needs scikit-learn: pip install -e .[test]") from exc
    for split in SPLITS:
        if (out_dir / split).exists():
            raise FileExistsError(f"{out_dir / split} exists; remove it or choose another folder")
    digits = load_digits()
    counts = {}
    for split_index, (split, indices) in enumerate(split_indices(digits.target, seed).items()):
        for name in class_names():
            (out_dir / split / name).mkdir(parents=True)
        for i in indices:
            rng = np.random.default_rng([seed, 2, split_index, int(i)])
            image = render_digit(digits.images[i], rng, size)
            path = out_dir / split / f"digit_{digits.target[i]}" / f"{split}_{i:04d}.jpg"
            image.save(path, "JPEG", quality=JPEG_QUALITY, subsampling=0)
        counts[split] = len(indices)
    return counts


def write_digits32(out_dir: Path, seed: int = 0, size: int = 32) -> Digits32Summary:
    """Images under ``out_dir/images``, then shards under ``out_dir/shards/{train,val}``."""
    out_dir = Path(out_dir)
    counts = write_images(out_dir / "images", seed, size)
    for split in SPLITS:
        classes = out_dir / "shards" / "train" / "classes.txt" if split == "val" else None
        options = ConvertOptions(prefix=split, samples_per_shard=SAMPLES_PER_SHARD, classes=classes, seed=seed)
        convert(out_dir / "images" / split, out_dir / "shards" / split, options, progress=False)
    return Digits32Summary(out_dir / "images", out_dir / "shards", class_names(), counts)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m smog_scale.data.synthetic.digits32 OUT_DIR [--seed S] [--size PX]``."""
    parser = argparse.ArgumentParser(prog="python -m smog_scale.data.synthetic.digits32",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="gets images/{train,val} and shards/{train,val}")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="default: 0")
    parser.add_argument("--size", type=int, default=32, metavar="PX", help="image side (default: 32)")
    args = parser.parse_args(argv)
    if args.size < 8:
        parser.error(f"--size {args.size}: at least 8 px")
    try:
        summary = write_digits32(args.out_dir, args.seed, args.size)
    except FileExistsError as exc:
        parser.error(str(exc))
    print(f"wrote {summary.counts} images of {len(summary.classes)} classes to {summary.images} "
          f"and their shards to {summary.shards}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
