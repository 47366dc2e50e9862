"""32-px digits with strong nuisances: a small labelled set for checking in minutes that a method learns.

``python -m smog_scale.data.synthetic.digits32 OUT_DIR`` writes ``OUT_DIR/images/{train,val}/digit_<d>/*.jpg``
(an ImageFolder) and converts both splits with the project's converter into ``OUT_DIR/shards/train``
and ``OUT_DIR/shards/val`` (the val shards index classes by the train shards' ``classes.txt``).
Nothing is downloaded; a few seconds to write; identical bytes for the same seed.

Every one of scikit-learn's 1,797 handwritten digits (10 classes, 8x8 glyphs) is drawn once, so
train (1,437) and val (360, a stratified 20%) never share a handwriting. Each image is ``size``
(32) px square:

- the background is a random patch (10-50% of the short side) of one of scikit-image's photos
  (astronaut, chelsea, coffee, rocket) or grey textures (brick, grass, gravel, tinted a random
  colour), flipped at random and squeezed into a dark band (0-100) or a light band (155-255);
- the digit is upscaled to 55-90% of the side, rotated by up to 20 degrees and pasted at a random
  place in an ink colour from the opposite band (light on dark, dark on light), so it stays legible
  whatever the background;
- the whole image then gets the demo set's colour shift (brightness, contrast, saturation, gains).

Backgrounds dominate the pixels, so raw-pixel neighbours mostly match backgrounds, not digits.
Needs scikit-image and scikit-learn (``pip install -e .[test]``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from smog_scale.data.converter.make_shards import ConvertOptions, convert
from smog_scale.data.synthetic.demo import PHOTOS, TEXTURES, shift_colours

SPLITS = ("train", "val")
VAL_FRACTION = 0.2  # 1,797 digits -> 1,437 train + 360 val
PATCH_RANGE = (0.1, 0.5)  # background patch side, as a fraction of the source's short side
GLYPH_RANGE = (0.55, 0.9)  # digit side before rotation, as a fraction of the image side
DARK, LIGHT = (0.0, 100.0), (155.0, 255.0)  # background bands; the ink takes the other one
MAX_ROTATION = 20.0  # degrees
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


def _backgrounds() -> list[np.ndarray]:
    """The photos [H, W, 3] and grey textures [H, W] of scikit-image, uint8."""
    try:
        import skimage.data
    except ImportError as exc:
        raise ImportError("the small data set needs scikit-image and scikit-learn: pip install -e .[test]") from exc
    return [getattr(skimage.data, name)() for name in (*PHOTOS, *TEXTURES)]


def _background(source: np.ndarray, rng: np.random.Generator, size: int, band: tuple[float, float]) -> np.ndarray:
    """A random square patch of ``source`` as float32 [size, size, 3] squeezed into ``band``."""
    height, width = source.shape[:2]
    side = round(min(height, width) * rng.uniform(*PATCH_RANGE))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    patch = Image.fromarray(source[top:top + side, left:left + side]).resize((size, size), Image.Resampling.BOX)
    pixels = np.asarray(patch, dtype=np.float32) / 255
    if pixels.ndim == 2:  # a grey texture: tint it, so that colour says nothing about the digit
        pixels = pixels[..., None] * rng.uniform(0.35, 1.0, size=3)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return band[0] + pixels * (band[1] - band[0])


def render_digit(glyph: np.ndarray, backgrounds: Sequence[np.ndarray], rng: np.random.Generator,
                 size: int = 32) -> Image.Image:
    """One ``size``-px RGB image of ``glyph`` (8x8, values 0-16) on a random background (module docstring)."""
    dark = rng.random() < 0.5
    background_band, ink_band = (DARK, LIGHT) if dark else (LIGHT, DARK)
    source = backgrounds[int(rng.integers(len(backgrounds)))]
    image = Image.fromarray(_background(source, rng, size, background_band).astype(np.uint8))
    side = max(4, round(size * rng.uniform(*GLYPH_RANGE)))
    mask = Image.fromarray((glyph * (255 / 16)).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    mask = mask.rotate(rng.uniform(-MAX_ROTATION, MAX_ROTATION), resample=Image.Resampling.BILINEAR, expand=True)
    mask = mask.crop(mask.getbbox() or (0, 0, *mask.size))  # ink only: the glyph can reach the borders
    if max(mask.size) > size:
        mask.thumbnail((size, size), Image.Resampling.BILINEAR)
    ink = Image.new("RGB", mask.size, tuple(int(c) for c in rng.uniform(*ink_band, size=3)))
    left = int(rng.integers(0, size - mask.width + 1))
    top = int(rng.integers(0, size - mask.height + 1))
    image.paste(ink, (left, top), mask)
    return shift_colours(image, rng)


def write_images(out_dir: Path, seed: int = 0, size: int = 32) -> dict[str, int]:
    """Write the ImageFolder ``out_dir/{train,val}/digit_<d>/*.jpg``; refuse to write over a split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the small data set needs scikit-image and scikit-learn: pip install -e .[test]") from exc
    for split in SPLITS:
        if (out_dir / split).exists():
            raise FileExistsError(f"{out_dir / split} exists; remove it or choose another folder")
    digits = load_digits()
    backgrounds = _backgrounds()
    counts = {}
    for split_index, (split, indices) in enumerate(split_indices(digits.target, seed).items()):
        for name in class_names():
            (out_dir / split / name).mkdir(parents=True)
        for i in indices:
            rng = np.random.default_rng([seed, 2, split_index, int(i)])
            image = render_digit(digits.images[i], backgrounds, rng, size)
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
