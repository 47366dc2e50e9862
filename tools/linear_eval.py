"""Linear probe of a frozen backbone: ``[accelerate launch] tools/linear_eval.py SOURCE --train-shards ...``.

MoCo v3 / DINO protocol: the backbone stays frozen in eval mode; a linear classifier on
batch-normalized features (BN without affine), SGD momentum 0.9, no weight decay, cosine schedule to
0 over 90 epochs, global batch 1024, lr = base lr x batch / 256 with base lr 0.1 (MoCo v3's ResNet
default). Training images get RandomResizedCrop(0.08-1) + flip each epoch; val images are center
crops. Several --lr values train side by side (one head each, same BN) and the best is reported.

--cache-features extracts center-crop train features once and trains on them: epochs take seconds,
which makes lr sweeps cheap, but it drops the per-epoch random-resized-crop augmentation, so its
numbers are not the standard protocol's; use it to pick the lr, then run once without it.

Multi-process through Accelerate (each process reads its share; DDP averages the gradients).
Every shard argument and the model are checked before any work. Bad input ends with one line and
exit code 2: missing files, missing, empty or non-tar shards, keys that do not fit, a batch that does
not split, too few samples, or a shard that fails while read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from accelerate import Accelerator

from smog_scale import dist
from smog_scale.data.shards import ShardError, build_train_loader, check_shards, read_manifest
from smog_scale.eval.features import shard_features
from smog_scale.eval.linear_probe import (
    Batches,
    LinearProbe,
    backbone_batches,
    probe_accuracy,
    probe_train_crop,
    shuffled_batches,
    train_linear_probe,
)
from smog_scale.export.loading import CheckpointLoadError, EvalBackbone, load_eval_backbone


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linear_eval.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE", help="export folder, run folder or checkpoint directory")
    parser.add_argument("--train-shards", required=True, metavar="URLS", help="labelled train shards (manifest beside)")
    parser.add_argument("--val-shards", required=True, metavar="URLS", help="labelled val shards")
    parser.add_argument("--which", choices=("online", "momentum"), default="online",
                        help="encoder of a run/checkpoint SOURCE (default: online)")
    parser.add_argument("--random-init", action="store_true", help="same architecture, untrained (seed 0)")
    parser.add_argument("--lr", type=float, nargs="+", default=[0.1], metavar="LR",
                        help="base lr(s) per 256 images; several train side by side (default: 0.1; "
                             "sweep e.g. 0.05 0.1 0.2 0.4 0.8 with --cache-features)")
    parser.add_argument("--epochs", type=int, default=90, help="default: 90 (MoCo v3; DINO uses 100)")
    parser.add_argument("--batch-size", type=int, default=1024, metavar="N",
                        help="global batch over all processes (default: 1024)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="default: 0")
    parser.add_argument("--cache-features", action="store_true",
                        help="train on center-crop features extracted once: fast lr sweeps, but without the "
                             "per-epoch random-resized-crop augmentation of the standard protocol")
    parser.add_argument("--image-size", type=int, metavar="PX", help="crop side (default: the model's input size)")
    parser.add_argument("--eval-batch-size", type=int, default=256, metavar="N",
                        help="images per process for feature extraction (default: 256)")
    parser.add_argument("--workers", type=int, default=8, metavar="N", help="loader workers per process (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument("--out", type=Path, metavar="JSON", help="also write the results here")
    return parser


def _num_classes(urls: str, labels_max: int) -> int:
    """Classes listed in the shards' manifest (at least the largest label + 1)."""
    try:
        return max(len(read_manifest(urls)["classes"]), labels_max + 1)
    except (FileNotFoundError, ValueError, KeyError):
        return labels_max + 1


def _train_batches(args: argparse.Namespace, model: EvalBackbone,
                   accelerator: Accelerator) -> tuple[Callable[[int], Batches], int]:
    """``epoch -> this process's (features, labels) batches`` and the steps per epoch: cached center-crop
    features, or augmented images through the frozen backbone."""
    per_process, size = args.batch_size // dist.world_size(), args.image_size or model.image_size
    if args.cache_features:
        feats, labels = shard_features(model.module, args.train_shards, accelerator, image_size=size,
                                       batch_size=args.eval_batch_size, num_workers=args.workers,
                                       desc="train features", normalized=False)
        steps = int(dist.all_gather_cat(labels.new_tensor([len(feats) // per_process])).min())
        return lambda epoch: shuffled_batches(feats, labels, per_process, epoch, args.seed), steps
    loader = build_train_loader(args.train_shards, crops=[probe_train_crop(size)], batch_size=per_process,
                                num_workers=args.workers, seed=args.seed, rank=dist.rank(),
                                world_size=dist.world_size())

    def epoch_batches(epoch: int) -> Batches:
        loader.set_epoch(epoch)
        return backbone_batches(model.module, loader, accelerator)

    return epoch_batches, len(loader)


def _report(args: argparse.Namespace, model: EvalBackbone, results: list[dict[str, float]]) -> None:
    best = max(range(len(results)), key=lambda h: results[h]["top1"])
    for head, (lr, result) in enumerate(zip(args.lr, results)):
        mark = "  <- best" if head == best else ""
        print(f"base lr {lr:g} (lr {lr * args.batch_size / 256:g}): top-1 {result['top1']:.2f}  "
              f"top-5 {result['top5']:.2f}{mark}")
    print(f"{model.description}: linear probe top-1 {results[best]['top1']:.2f} top-5 {results[best]['top5']:.2f} "
          f"({args.epochs} epochs, {'cached center-crop features' if args.cache_features else 'augmented'})")
    if args.out:
        record = {"model": model.description, "epochs": args.epochs, "batch_size": args.batch_size,
                  "cache_features": args.cache_features, "best_base_lr": args.lr[best], **results[best],
                  "per_lr": [dict(base_lr=lr, **r) for lr, r in zip(args.lr, results)]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    accelerator = Accelerator()
    try:
        if args.batch_size % dist.world_size():
            raise ValueError(f"--batch-size {args.batch_size} does not split over {dist.world_size()} processes")
        for urls in (args.train_shards, args.val_shards):  # both, before the model and any extraction
            check_shards(urls)
        model = load_eval_backbone(args.source, args.which, args.random_init)
        model.module.to(accelerator.device).requires_grad_(False)
        val_feats, val_labels = shard_features(model.module, args.val_shards, accelerator,
                                               image_size=args.image_size or model.image_size,
                                               batch_size=args.eval_batch_size, num_workers=args.workers,
                                               desc="val features", normalized=False)
        val_feats, val_labels = dist.all_gather_cat(val_feats), dist.all_gather_cat(val_labels)
        epoch_batches, steps = _train_batches(args, model, accelerator)
        if steps < 1:
            raise ValueError(f"the train shards hold less than one batch of {args.batch_size} per epoch")
        probe = LinearProbe(val_feats.shape[1], _num_classes(args.train_shards, int(val_labels.max())), len(args.lr))
        train_linear_probe(probe, accelerator, epoch_batches, epochs=args.epochs, steps_per_epoch=steps,
                           lrs=[lr * args.batch_size / 256 for lr in args.lr], momentum=args.momentum,
                           weight_decay=args.weight_decay)
    except (CheckpointLoadError, ShardError, OSError, ValueError) as err:
        print(f"linear_eval: error: {err}", file=sys.stderr)
        return 2
    results = probe_accuracy(probe, val_feats, val_labels)
    if accelerator.is_main_process:
        _report(args, model, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
