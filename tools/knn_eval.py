"""Weighted kNN accuracy of a backbone: ``[accelerate launch] tools/knn_eval.py SOURCE --train-shards ...``.

InstDisc / DINO protocol: center-crop features of the train and val shards, L2-normalized; each val
image takes the k = 20 most cosine-similar train images, weighted exp(cos / 0.07); top-1 and top-5.
Multi-process through Accelerate: each process extracts its share of the shards and searches its
own train features (in blocks, never a val x train matrix); the candidates are merged across processes.

SOURCE is a folder written by tools/export_timm.py, a run folder (newest complete checkpoint) or a
checkpoint directory. --random-init evaluates the same architecture untrained (the baseline the
pretrained number must beat). --bn-batches N first replaces the backbone's BatchNorm statistics by their
average over the first N batches of the train shards (center crops, read in order by every process; no
weight changes): with --random-init it gives the same random weights with the data's statistics, which
separates what pretraining learned from what BatchNorm statistics alone change. Every shard argument and the
model are checked before any work. Bad input ends with one line and exit code 2: missing files, missing,
empty or non-tar shards, keys that do not fit, or a shard that fails while read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from itertools import islice
from pathlib import Path

from accelerate import Accelerator

from smog_scale.data.shards import ShardError, build_eval_loader, check_shards
from smog_scale.eval.batchnorm import reestimate_batchnorm
from smog_scale.eval.features import shard_features
from smog_scale.eval.knn import KNN_K, KNN_TEMPERATURE, knn_evaluate
from smog_scale.export.loading import CheckpointLoadError, load_eval_backbone


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knn_eval.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE", help="export folder, run folder or checkpoint directory")
    parser.add_argument("--train-shards", required=True, metavar="URLS",
                        help="labelled train shards, e.g. /data/in1k-train/in1k-train-{000000..001023}.tar")
    parser.add_argument("--val-shards", required=True, metavar="URLS", help="labelled val shards")
    parser.add_argument("--which", choices=("online", "momentum"), default="online",
                        help="encoder of a run/checkpoint SOURCE (default: online)")
    parser.add_argument("--random-init", action="store_true", help="same architecture, untrained (seed 0)")
    parser.add_argument("--bn-batches", type=int, default=0, metavar="N",
                        help="re-estimate BatchNorm statistics on N train batches first (default: 0, off)")
    parser.add_argument("--k", type=int, default=KNN_K, help=f"neighbours (default: {KNN_K})")
    parser.add_argument("--temperature", type=float, default=KNN_TEMPERATURE,
                        help=f"vote weight exp(cos / T) (default: {KNN_TEMPERATURE})")
    parser.add_argument("--image-size", type=int, metavar="PX",
                        help="center-crop side (default: the model's input size, 224 for the paper's recipes)")
    parser.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per process (default: 256)")
    parser.add_argument("--workers", type=int, default=8, metavar="N", help="loader workers per process (default: 8)")
    parser.add_argument("--out", type=Path, metavar="JSON", help="also write the result here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bn_batches < 0:
        parser.error(f"--bn-batches {args.bn_batches}: must be >= 0")
    try:
        for urls in (args.train_shards, args.val_shards):  # both, before the model and any extraction
            check_shards(urls)
        model = load_eval_backbone(args.source, args.which, args.random_init)
        accelerator = Accelerator()
        backbone = model.module.to(accelerator.device)
        options = dict(image_size=args.image_size or model.image_size, batch_size=args.batch_size,
                       num_workers=args.workers)
        if args.bn_batches:
            loader = build_eval_loader(args.train_shards, **options)
            reestimate_batchnorm(backbone, (images.to(accelerator.device) for images, *_ in
                                            islice(loader, args.bn_batches)))
        train = shard_features(backbone, args.train_shards, accelerator, desc="train features", **options)
        val = shard_features(backbone, args.val_shards, accelerator, desc="val features", **options)
    except (CheckpointLoadError, ShardError, OSError, ValueError) as err:
        print(f"knn_eval: error: {err}", file=sys.stderr)
        return 2
    result = knn_evaluate(*train, *val, k=args.k, temperature=args.temperature)
    bn_note = f", BatchNorm statistics of {args.bn_batches} train batches" if args.bn_batches else ""
    if accelerator.is_main_process:
        record = {"model": model.description, "bn_batches": args.bn_batches, "k": args.k,
                  "temperature": args.temperature, "image_size": options["image_size"], **result}
        print(f"{model.description}{bn_note}: kNN (k={args.k}, T={args.temperature}) "
              f"top-1 {result['knn_top1']:.2f}  top-5 {result['knn_top5']:.2f}")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
