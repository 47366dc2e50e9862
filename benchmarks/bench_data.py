"""Data-pipeline throughput: smog_scale's shard pipeline vs torchvision ImageFolder, same images.

Writes ~2,000 photos of ImageNet-like size (about 500x375 JPEG, made from scikit-image's bundled
sample photos by random crops, resizes, colour shifts and flips) once as an ImageFolder and once as
WebDataset shards, then measures images/s (median over repeats, worker start-up included) of:

* ImageFolder + DataLoader with the multi-crop transform written with torchvision as users write
  it (RandomResizedCrop, ColorJitter, GaussianBlur(23), RandomSolarize, ToTensor, Normalize);
* the plain webdataset port of that same transform;
* smog_scale.data.shards.build_train_loader with the same crops (byol_crops).

Both the 2 global + 6 local recipe (the target) and the two-view BYOL recipe are measured.
Also prints per-image decode costs (PIL, torchvision.io, PIL draft) for context.

    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_data.py [--images 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import skimage.data
import torch
import torchvision.transforms as T
import webdataset as wds
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.io import decode_jpeg

from smog_scale.data.multicrop import CropSpec, MultiCrop, byol_crops, decode_rgb
from smog_scale.data.shards import build_train_loader

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")
SHARD_SIZE = 250


def make_photo(source: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A random ~500x375 (or portrait) view of a sample photo with a colour shift."""
    height, width = source.shape[:2]
    side = rng.uniform(0.45, 1.0)
    crop_w, crop_h = int(width * side), int(height * side * rng.uniform(0.8, 1.0))
    top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
    gains = rng.uniform(0.8, 1.2, size=3)
    pixels = np.clip(source[top:top + crop_h, left:left + crop_w] * gains, 0, 255).astype(np.uint8)
    size = (500, 375) if rng.random() < 0.8 else (375, 500)
    image = Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def write_dataset(root: Path, count: int) -> tuple[Path, str]:
    """Write ``count`` JPEGs as ``root/folder/<class>/*.jpg`` and as shards; return (folder, urls)."""
    rng = np.random.default_rng(0)
    sources = [getattr(skimage.data, name)() for name in PHOTOS]
    folder, shard_dir = root / "folder", root / "shards"
    shard_dir.mkdir(parents=True)
    num_shards = -(-count // SHARD_SIZE)
    entries = []
    for shard in range(num_shards):
        name = f"bench-{shard:06d}.tar"
        size = min(SHARD_SIZE, count - shard * SHARD_SIZE)
        with wds.TarWriter(str(shard_dir / name)) as sink:
            for index in range(shard * SHARD_SIZE, shard * SHARD_SIZE + size):
                label = index % len(PHOTOS)
                out = io.BytesIO()
                make_photo(sources[label], rng).save(out, "JPEG", quality=int(rng.integers(75, 96)))
                (folder / PHOTOS[label]).mkdir(parents=True, exist_ok=True)
                (folder / PHOTOS[label] / f"{index:06d}.jpg").write_bytes(out.getvalue())
                sink.write({"__key__": f"{index:06d}", "jpg": out.getvalue(), "cls": label})
        entries.append({"name": name, "samples": size})
    manifest = {"format": 1, "tool_version": "bench", "shards": entries, "num_samples": count,
                "classes": list(PHOTOS), "options": {}, "skipped": 0, "report": ""}
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    return folder, str(shard_dir / f"bench-{{000000..{num_shards - 1:06d}}}.tar")


def torchvision_view(spec: CropSpec) -> T.Compose:
    """One view of ``spec`` written with torchvision as users write it (BYOL/DINO code)."""
    interpolation = T.InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    return T.Compose([
        T.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, interpolation=interpolation),
        T.RandomHorizontalFlip(p=spec.flip_p),
        T.RandomApply([T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_p),
        T.RandomGrayscale(p=spec.grayscale_p),
        T.RandomApply([T.GaussianBlur(23, sigma=spec.blur_sigma)], p=spec.blur_p),
        T.RandomSolarize(spec.solarize_threshold, p=spec.solarize_p),
        T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])


class TorchvisionMultiCrop:
    """PIL image -> list of normalized float views, one Compose per view (DINO's DataAugmentation)."""

    def __init__(self, crops: Iterable[CropSpec]) -> None:
        self.views = [torchvision_view(spec) for spec in crops for _ in range(spec.count)]

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [view(image) for view in self.views]


def imagefolder_loader(folder: Path, urls: str, crops: tuple[CropSpec, ...], args: argparse.Namespace) -> Iterable:
    dataset = ImageFolder(str(folder), transform=TorchvisionMultiCrop(crops))
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=args.measure_images)
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                       num_workers=args.workers, drop_last=True)


def webdataset_port_loader(folder: Path, urls: str, crops: tuple[CropSpec, ...], args: argparse.Namespace) -> Iterable:
    dataset = (
        wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=None)
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(TorchvisionMultiCrop(crops), int)
        .batched(args.batch_size, collation_fn=torch.utils.data.default_collate, partial=False)
        .with_epoch(args.measure_images // args.batch_size // args.workers)
    )
    return wds.WebLoader(dataset, batch_size=None, num_workers=args.workers)


def smog_loader(folder: Path, urls: str, crops: tuple[CropSpec, ...], args: argparse.Namespace) -> Iterable:
    return build_train_loader(urls, crops=crops, batch_size=args.batch_size, num_workers=args.workers, seed=0,
                              num_samples=args.measure_images)


PIPELINES = (
    ("torchvision ImageFolder", imagefolder_loader),
    ("webdataset port of torchvision", webdataset_port_loader),
    ("smog_scale shards", smog_loader),
)
RECIPES = (("2 global + 6 local", byol_crops(num_local=6)), ("2 global (BYOL)", byol_crops()))


def images_per_second(make_loader: Callable[[], Iterable], repeats: int) -> float:
    """Median images/s over ``repeats`` full passes, worker start-up included."""
    rates = []
    for _ in range(repeats):
        start, seen = time.perf_counter(), 0
        for batch in make_loader():
            first = batch["crops"][0] if isinstance(batch, dict) else batch[0][0]
            seen += first.shape[-4]
        rates.append(seen / (time.perf_counter() - start))
    return statistics.median(rates)


def _jpeg_of_size(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).resize(size, Image.Resampling.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


def decode_costs(repeats: int = 30) -> list[tuple[str, float]]:
    """Per-image decode cost (ms) of a 500x375 and a 2000x1500 JPEG, one thread."""
    rows = []
    limit = MultiCrop(byol_crops(num_local=6)).min_decode_area
    for size in ((500, 375), (2000, 1500)):
        data = _jpeg_of_size(size)
        decoders: dict[str, Callable[[], object]] = {
            "PIL": lambda: decode_rgb(data),
            "torchvision.io.decode_jpeg": lambda: decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)),
            f"PIL draft for 2x224+6x96 (scale {decode_rgb(data, min_area=limit)[2]:g})":
                lambda: decode_rgb(data, min_area=limit),
        }
        for name, decode in decoders.items():
            start = time.perf_counter()
            for _ in range(repeats):
                decode()
            rows.append((f"{size[0]}x{size[1]} {name}", (time.perf_counter() - start) / repeats * 1e3))
    return rows


def throughput(folder: Path, urls: str, args: argparse.Namespace) -> list[tuple[str, str, float, float]]:
    """(recipe, pipeline, images/s, ratio vs ImageFolder) for every recipe and pipeline."""
    rows = []
    for recipe, crops in RECIPES:
        baseline = None
        for pipeline, make_loader in PIPELINES:
            rate = images_per_second(lambda: make_loader(folder, urls, crops, args), args.repeats)
            baseline = baseline or rate
            rows.append((recipe, pipeline, rate, rate / baseline))
            print(f"  {recipe:20s} {pipeline:32s} {rate:7.1f} images/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="photos written to the data set")
    parser.add_argument("--measure-images", type=int, default=512, help="images per timed pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        rows = throughput(*write_dataset(root, args.images), args)
    finally:
        shutil.rmtree(root)
    print(f"\n{args.images} photos ~500x375, {args.workers} workers, batch {args.batch_size}, "
          f"{args.measure_images} images per pass, median of {args.repeats}\n")
    print("| crops | pipeline | images/s | vs ImageFolder |\n|---|---|---:|---:|")
    for recipe, pipeline, rate, ratio in rows:
        print(f"| {recipe} | {pipeline} | {rate:.1f} | {ratio:.2f}x |")
    print("\n| decode (one thread) | ms/image |\n|---|---:|")
    for name, ms in decode_costs():
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
