"""Convert an ImageNet-style image collection into shuffled WebDataset tar shards with a manifest.

``smog-make-shards SOURCE OUTPUT_DIR`` (or ``tools/make_shards.py``) reads any layout that
``smog_scale.data.converter.sources`` detects and writes ``PREFIX-000000.tar, ...``, each sample holding
``__key__``, ``jpg`` (the original bytes, re-encoded only when they are not an RGB JPEG or exceed
``--max-side``) and ``cls`` (the class index as ASCII), plus ``classes.txt``, ``report.json`` and,
last, ``manifest.json``, whose schema the training pipeline reads::

    {"format": 1, "tool_version": str, "shards": [{"name": str, "samples": int}], "num_samples": int,
     "classes": [str], "options": {...}, "skipped": int, "report": "report.json"}

The conversion is planned before anything is written: inputs are listed in sorted order, shuffled
with the seed and cut into shards, so a rerun computes the same plan. Each shard is written to a
temp file under ``OUTPUT_DIR/.make_shards/``, its outcome is recorded there, and then it is renamed
into place, so a rerun after an interruption skips every complete shard. A worker process killed
abruptly (the out-of-memory killer) ends the conversion with one line naming the input it was
converting (``WorkerDied``); the complete shards stay, and a rerun resumes.

Nothing is dropped silently: in ``report.json``, ``inputs == samples + len(skipped) + len(ignored)``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from smog_scale import __version__
from smog_scale.data.converter import worker_pool
from smog_scale.data.converter.sources import ConversionError, InputImage, Inventory, read_class_list, scan_source

JPEG_QUALITY = 95
MANIFEST_FORMAT = 1
PROGRESS_DIR = ".make_shards"  # temp shards and per-shard records: what lets a rerun resume
_TAR_BYTES_PER_SAMPLE = 3 * 512  # headers and padding of the jpg and cls members, for --shard-size


@dataclass(frozen=True)
class ConvertOptions:
    """What the conversion does. ``shard_size_mb`` applies only when ``samples_per_shard`` is None."""

    labels: Path | None = None
    classes: Path | None = None
    prefix: str = "shard"
    samples_per_shard: int | None = None
    shard_size_mb: float = 256.0
    max_side: int | None = None
    workers: int = 1
    seed: int = 0


def plan_shards(images: Sequence[InputImage], options: ConvertOptions) -> list[list[InputImage]]:
    """Shuffle with the seed, then cut by sample count or by (input) byte size."""
    order = list(images)
    random.Random(options.seed).shuffle(order)
    if options.samples_per_shard is not None:
        n = options.samples_per_shard
        return [order[i : i + n] for i in range(0, len(order), n)]
    budget = options.shard_size_mb * 2**20
    shards: list[list[InputImage]] = [[]]
    used = 0.0
    for image in order:
        cost = image.size + _TAR_BYTES_PER_SAMPLE
        if shards[-1] and used + cost > budget:
            shards.append([])
            used = 0.0
        shards[-1].append(image)
        used += cost
    return shards if shards[0] else []


@dataclass(frozen=True)
class ShardTask:
    """One shard to write; ``fingerprint`` identifies the whole plan it belongs to."""

    name: str
    images: tuple[InputImage, ...]
    out_dir: str
    max_side: int | None
    fingerprint: str


@dataclass(frozen=True)
class Encoded:
    """JPEG bytes ready for a shard; ``converted_from`` is ``"FORMAT/MODE"`` when not the original file."""

    data: bytes
    converted_from: str | None
    resized: bool


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any mode; transparent pixels land on white rather than on whatever they hide."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def encode_jpeg(data: bytes, max_side: int | None = None) -> Encoded:
    """Check that ``data`` decodes fully; keep it when it is an RGB JPEG within ``max_side``.

    Anything else (CMYK, grayscale, palette, alpha, PNG or other formats under any file name,
    or a side above ``max_side``) is re-encoded as RGB JPEG at quality ``JPEG_QUALITY``.
    Raises PIL's errors (``OSError``, ``SyntaxError``, ...) for corrupt or truncated data.
    """
    with Image.open(io.BytesIO(data)) as probe:
        probe.verify()
    with Image.open(io.BytesIO(data)) as image:
        source = f"{image.format}/{image.mode}"
        limit = max_side if max_side is not None and max(image.size) > max_side else None
        if limit is not None:
            image.draft(None, (limit, limit))  # JPEG: decode at a reduced scale, still no smaller than asked
        image.load()  # a truncated file fails here
        plain = image.format in ("JPEG", "MPO") and image.mode == "RGB"
        if plain and limit is None:
            return Encoded(data, None, False)
        rgb = _to_rgb(image)
    if limit is not None:
        rgb.thumbnail((limit, limit), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=JPEG_QUALITY)
    return Encoded(out.getvalue(), None if plain else source, limit is not None)


def _read(image: InputImage) -> bytes:
    with open(image.file, "rb") as f:
        f.seek(image.offset)
        data = f.read(image.size)
    if len(data) != image.size:
        raise OSError(f"read {len(data)} of {image.size} bytes")
    return data


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard atomically and return its record (also saved for a resumed run)."""
    progress = Path(task.out_dir) / PROGRESS_DIR
    record: dict[str, Any] = {"name": task.name, "samples": 0, "skipped": [], "converted": [], "resized": 0}
    tmp = progress / f"{task.name}.tmp"
    with open(tmp, "wb") as stream:
        with wds.TarWriter(stream, mtime=0, format="PAX_FORMAT") as sink:
            for image in task.images:
                worker_pool.mark(f"converting {image.origin} (for {task.name})")
                try:
                    encoded = encode_jpeg(_read(image), task.max_side)
                # PIL raises many types on damaged data (OSError, SyntaxError, ValueError, struct.error,
                # DecompressionBombError, ...); every one of them means "skip and report this input".
                except Exception as exc:  # noqa: BLE001
                    record["skipped"].append({"path": image.origin, "reason": f"{type(exc).__name__}: {exc}"})
                    continue
                sink.write({"__key__": image.key, "jpg": encoded.data, "cls": image.label})
                record["samples"] += 1
                record["resized"] += encoded.resized
                if encoded.converted_from:
                    record["converted"].append({"path": image.origin, "from": encoded.converted_from})
        stream.flush()
        os.fsync(stream.fileno())
    worker_pool.mark("")
    _write_json(progress / f"{task.name}.json", {**record, "fingerprint": task.fingerprint})
    os.replace(tmp, Path(task.out_dir) / task.name)
    return record


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON to a temp file and rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _fingerprint(inventory: Inventory, shards: list[list[InputImage]], options: ConvertOptions) -> str:
    """Identifies the plan by relative keys, so the source may move between a run and its resumption."""
    digest = hashlib.sha256(json.dumps([inventory.classes, options.max_side, options.prefix]).encode())
    for shard in shards:
        digest.update(json.dumps([[i.key, i.label, i.size] for i in shard]).encode())
    return digest.hexdigest()


def _finished_records(out_dir: Path, fingerprint: str) -> dict[str, dict[str, Any]]:
    """Records of complete shards of this plan; raise when the folder holds another conversion."""
    records = {}
    for path in sorted((out_dir / PROGRESS_DIR).glob("*.tar.json")):
        record = json.loads(path.read_text())
        if record.pop("fingerprint") != fingerprint:
            raise ConversionError(
                f"{out_dir} holds shards of a different conversion (other source, options or seed); "
                "write to an empty folder or empty this one"
            )
        if (out_dir / record["name"]).is_file():
            records[record["name"]] = record
    return records


def _manifest_options(source: Path, options: ConvertOptions) -> dict[str, Any]:
    """The options that shape the output, JSON-ready (worker count is not one of them)."""
    chosen = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items() if k != "workers"}
    if options.samples_per_shard is not None:
        chosen["shard_size_mb"] = None
    return {"source": str(source), **chosen}


def _write_outputs(
    out_dir: Path, source: Path, inventory: Inventory, records: list[dict[str, Any]], options: ConvertOptions
) -> dict[str, Any]:
    """Write ``classes.txt``, ``report.json`` and, last, ``manifest.json``; return the manifest."""
    skipped = inventory.skipped + [s for r in records for s in r["skipped"]]
    samples = sum(r["samples"] for r in records)
    report = {
        "source": str(source),
        "layout": inventory.layout,
        "inputs": len(inventory.images) + len(inventory.skipped) + len(inventory.ignored),
        "samples": samples,
        "skipped": skipped,
        "ignored": inventory.ignored,
        "empty_classes": inventory.empty_classes,
        "converted": [c for r in records for c in r["converted"]],
        "resized": sum(r["resized"] for r in records),
        "labels_without_image": inventory.labels_without_image,
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "tool_version": __version__,
        "shards": [{"name": r["name"], "samples": r["samples"]} for r in records],
        "num_samples": samples,
        "classes": inventory.classes,
        "options": _manifest_options(source, options),
        "skipped": len(skipped),
        "report": "report.json",
    }
    (out_dir / "classes.txt").write_text("".join(f"{name}\n" for name in inventory.classes))
    _write_json(out_dir / "report.json", report)
    _write_json(out_dir / "manifest.json", manifest)
    return manifest


def convert(source: Path, out_dir: Path, options: ConvertOptions, progress: bool = True) -> dict[str, Any]:
    """Convert SOURCE into shards in ``out_dir``, resuming an earlier run of the same plan.

    Returns the manifest. Raises ``ConversionError`` for an undetectable or empty source, an ``out_dir``
    inside the source folder or holding another conversion's shards, and ``WorkerDied`` when a worker
    process is killed.
    """
    if source.is_dir() and out_dir.resolve().is_relative_to(source.resolve()):
        raise ConversionError(f"the output folder {out_dir} is inside the source folder {source}: a rerun would "
                              "read its shards as input; write the shards elsewhere")
    classes = read_class_list(options.classes) if options.classes else None
    inventory = scan_source(source, options.labels, classes)
    if not inventory.images:
        counts = f"{len(inventory.skipped)} skipped, {len(inventory.ignored)} ignored"
        raise ConversionError(f"{source}: no images to convert ({counts})")
    shards = plan_shards(inventory.images, options)
    fingerprint = _fingerprint(inventory, shards, options)
    (out_dir / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    done = _finished_records(out_dir, fingerprint)
    for stale in (out_dir / PROGRESS_DIR).glob("*.tmp"):  # left by an interrupted run
        stale.unlink()
    names = [f"{options.prefix}-{i:06d}.tar" for i in range(len(shards))]
    tasks = [
        ShardTask(name, tuple(shard), str(out_dir), options.max_side, fingerprint)
        for name, shard in zip(names, shards, strict=True)
        if name not in done
    ]
    total = sum(len(t.images) for t in tasks)
    with tqdm(total=total, unit="img", disable=None if progress else True) as bar:  # None: off unless a TTY
        advice = ("complete shards are kept, rerun the same command to resume (with fewer --workers, or "
                  "--max-side, if memory is short)")
        for record in worker_pool.map_unordered(write_shard, tasks, options.workers, who="converter worker",
                                                advice=advice):
            done[record["name"]] = record
            bar.update(len(record["skipped"]) + record["samples"])
    return _write_outputs(out_dir, source, inventory, [done[name] for name in names], options)


def _positive(kind: type[int] | type[float]) -> Any:
    """An argparse ``type`` that accepts only numbers above zero."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smog-make-shards",
        description="Convert ImageNet-style images (an ImageFolder tree, a flat validation folder with a "
        "label file, or the training archive of per-class tars) into shuffled WebDataset tar shards.",
    )
    parser.add_argument(
        "source", type=Path, metavar="SOURCE", help="ImageFolder root, flat folder of images, or tar of per-class tars"
    )
    parser.add_argument(
        "out_dir", type=Path, metavar="OUTPUT_DIR", help="gets the shards, manifest.json, classes.txt and report.json"
    )
    parser.add_argument(
        "--labels",
        type=Path,
        metavar="FILE",
        help="label file of a flat folder: LOC_val_solution.csv form or 'filename class' "
        "lines (default: LOC_val_solution.csv in SOURCE or beside it)",
    )
    parser.add_argument(
        "--classes",
        type=Path,
        metavar="FILE",
        help="class list to index against, one name per line (e.g. the train conversion's "
        "classes.txt, so that val shares its indices); other classes are skipped and reported",
    )
    parser.add_argument(
        "--prefix",
        default="shard",
        metavar="NAME",
        help="shards are named NAME-000000.tar, NAME-000001.tar, ... (default: shard)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=_positive(int), metavar="N", help="samples per shard")
    size.add_argument(
        "--shard-size",
        type=_positive(float),
        default=256.0,
        metavar="MB",
        help="target shard size in MiB, packed by input file size (default: 256; 100-1000 "
        "streams well; with --max-side the shards come out smaller)",
    )
    parser.add_argument(
        "--max-side",
        type=_positive(int),
        metavar="N",
        help="re-encode images whose longer side exceeds N (e.g. 512) to save disk and decode "
        "time; smaller RGB JPEGs keep their original bytes",
    )
    parser.add_argument(
        "--workers",
        type=_positive(int),
        default=min(8, os.cpu_count() or 1),
        metavar="N",
        help="parallel writer processes (default: min(8, CPUs))",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed of the shuffle across shards (default: 0)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: ``smog-make-shards SOURCE OUTPUT_DIR [...]``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    options = ConvertOptions(
        labels=args.labels,
        classes=args.classes,
        prefix=args.prefix,
        samples_per_shard=args.samples_per_shard,
        shard_size_mb=args.shard_size,
        max_side=args.max_side,
        workers=args.workers,
        seed=args.seed,
    )
    try:
        manifest = convert(args.source, args.out_dir, options)
    except ConversionError as exc:
        parser.error(str(exc))
    except worker_pool.WorkerDied as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {manifest['num_samples']} samples of {len(manifest['classes'])} classes in "
        f"{len(manifest['shards'])} shards to {args.out_dir}; skipped {manifest['skipped']} "
        f"(see {args.out_dir / 'report.json'})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
