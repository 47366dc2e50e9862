"""Semi-supervised fine-tuning (Table 4): ``[accelerate launch] tools/finetune.py SOURCE --train-shards ...``.

    accelerate launch tools/finetune.py out/r50_400ep --train-shards /data/in1k-train --val-shards /data/in1k-val \\
        --fraction 0.01 --epochs 60 --out out/ft_1pct.json
    accelerate launch tools/finetune.py out/r50_400ep ... --subset 1percent.txt --epochs 60 --out out/ft_1pct.json

Fine-tunes the whole backbone of SOURCE (a folder from tools/export_timm.py, a run folder or a
checkpoint) plus a linear classifier on a labelled subset of the training shards, then reports
top-1 / top-5 on the validation shards (console and --out). SimCLR's protocol (Chen et al. 2020,
appendix B.5), under which BYOL and SMoG report: SGD with Nesterov momentum 0.9, no weight decay or
other regularization, no warm-up, lr = 0.05 x global batch / 256 on a per-step cosine to 0, 60 epochs
for 1% of the labels and 30 for 10%, augmentation only a random resized crop + flip, a center crop for
evaluation; the classifier starts at zero and BatchNorm is synchronized over CUDA processes, as in
SimCLR's code (zero_init_logits_layer, global_bn).

The subset: --fraction F draws round(F x n_c) images of every class c with --seed (a class left
without an image is an error); --subset FILE takes the images FILE names, one per line, as SimCLR's
published lists do (imagenet_subsets/1percent.txt, 10percent.txt: "n01440764_10026.JPEG" matches the
key ".../n01440764_10026"; a name not in the shards is an error naming it). The keys used are saved
as OUT.keys.txt (pass it back with --subset to reuse the subset), and the subset's images are copied
once into OUT.work/subset/ (local shards only; reused while the subset is the same).

OUT.work/checkpoint.pt is written after every epoch; rerunning the same command resumes after the last
complete epoch (a checkpoint of other settings is an error, not overwritten). Multi-process through
Accelerate (each process reads its share; DDP averages the gradients); OUT's folder must be shared by
all nodes. Exit code 2 on bad input, before any work where it can be known then (missing shards or
files, a subset that does not fit the shards, a batch that does not split).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from accelerate import Accelerator

from smog_scale import dist
from smog_scale.data.shards import ShardOpenError, check_shards, read_manifest
from smog_scale.eval.finetune import (
    Classifier,
    MainProcessFailed,
    Settings,
    evaluate,
    finetune,
    prepare_subset,
    subset_loader,
)
from smog_scale.export.loading import CheckpointLoadError, load_eval_backbone


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1] (1% of the labels is 0.01)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE", help="export folder, run folder or checkpoint directory")
    parser.add_argument("--train-shards", required=True, metavar="URLS",
                        help="labelled train shards (local, with the converter's manifest.json)")
    parser.add_argument("--val-shards", required=True, metavar="URLS", help="labelled val shards")
    subset = parser.add_mutually_exclusive_group(required=True)
    subset.add_argument("--fraction", type=_fraction, metavar="F", help="class-balanced share of the labels, "
                        "e.g. 0.01 or 0.1")
    subset.add_argument("--subset", type=Path, metavar="FILE", help="image names or keys to train on, one per line")
    parser.add_argument("--epochs", type=int, required=True, help="SimCLR: 60 for 1%% of the labels, 30 for 10%%")
    parser.add_argument("--out", type=Path, required=True, metavar="RESULT.json",
                        help="the result; OUT.keys.txt and OUT.work/ go beside it")
    parser.add_argument("--lr", type=float, default=0.05, metavar="LR",
                        help="base lr per 256 images (default: 0.05, SimCLR)")
    parser.add_argument("--batch-size", type=int, default=1024, metavar="N",
                        help="global batch over all processes (default: 1024; SimCLR used 4096)")
    parser.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum (default: 0.9)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="default: 0 (SimCLR: no regularization)")
    parser.add_argument("--seed", type=int, default=0, help="subset draw and data order (default: 0)")
    parser.add_argument("--which", choices=("online", "momentum"), default="online",
                        help="encoder of a run/checkpoint SOURCE (default: online)")
    parser.add_argument("--image-size", type=int, metavar="PX", help="crop side (default: the model's input size)")
    parser.add_argument("--eval-batch-size", type=int, default=256, metavar="N",
                        help="validation images per process (default: 256)")
    parser.add_argument("--workers", type=int, default=8, metavar="N", help="loader workers per process (default: 8)")
    return parser


def _check_inputs(args: argparse.Namespace) -> None:
    """What can be checked before any work: shards, files, the batch split, the class lists."""
    check_shards(args.train_shards)
    check_shards(args.val_shards)
    if args.subset is not None and not args.subset.is_file():
        raise FileNotFoundError(f"--subset {args.subset}: no such file")
    if args.epochs < 1 or args.batch_size % dist.world_size():
        raise ValueError(f"--epochs {args.epochs} must be >= 1 and --batch-size {args.batch_size} split evenly over "
                         f"{dist.world_size()} processes")
    classes = read_manifest(args.train_shards).get("classes")
    val_classes = read_manifest(args.val_shards).get("classes")
    if not classes or (val_classes and val_classes != classes):
        raise ValueError(f"{args.val_shards}: the manifests of the train and val shards must list the same classes")


def _describe(args: argparse.Namespace, manifest: dict, epoch_samples: int, steps: int, keys_file: Path) -> None:
    drawn = f"from {args.subset}" if args.subset else f"fraction {args.fraction:g} of every class, seed {args.seed}"
    print(f"subset: {manifest['num_samples']} labelled images of {len(manifest['classes'])} classes ({drawn}); "
          f"keys in {keys_file}")
    print(f"{steps} steps of {args.batch_size} images per epoch ({epoch_samples} of the subset's "
          f"{manifest['num_samples']}: whole batches per process and loader worker)")
    if epoch_samples < 0.9 * manifest["num_samples"]:
        print("note: an epoch leaves out over 10% of the subset; fewer --workers or a smaller --batch-size "
              "let it see more")


def _report(args: argparse.Namespace, record: dict) -> None:
    print(f"{record['model']}: fine-tuned on {record['subset']['num_samples']} labelled images for {args.epochs} "
          f"epochs: top-1 {record['top1']:.2f}  top-5 {record['top5']:.2f} ({record['val_samples']} val images)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    accelerator = Accelerator()
    work_dir, keys_file = args.out.with_suffix(".work"), args.out.with_suffix(".keys.txt")
    try:
        _check_inputs(args)
        source = load_eval_backbone(args.source, args.which)
        manifest = prepare_subset(args.train_shards, work_dir, keys_file, accelerator, fraction=args.fraction,
                                  names_file=args.subset, seed=args.seed, workers=args.workers)
        size = args.image_size or source.image_size
        settings = Settings(str(Path(args.source).resolve()), manifest["subset_sha256"], len(manifest["classes"]),
                            args.epochs, args.lr, args.batch_size, args.momentum, True, args.weight_decay, size,
                            args.seed)
        loader = subset_loader(work_dir, len(manifest["shards"]), image_size=size, batch_size=args.batch_size,
                               workers=args.workers, seed=args.seed)
        model = Classifier(source.module, cast(int, source.module.num_features), settings.num_classes)
        if accelerator.is_main_process:
            _describe(args, manifest, loader.num_samples, len(loader), keys_file)
        history = finetune(model, loader, accelerator, settings, work_dir)
    except MainProcessFailed:
        return 2
    except (CheckpointLoadError, ShardOpenError, FileNotFoundError, ValueError) as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        return 2
    result = evaluate(model, args.val_shards, accelerator, image_size=size, batch_size=args.eval_batch_size,
                      num_workers=args.workers)
    if accelerator.is_main_process:
        subset = {"num_samples": manifest["num_samples"], "sha256": manifest["subset_sha256"], "keys": str(keys_file),
                  **({"file": str(args.subset)} if args.subset else {"fraction": args.fraction, "seed": args.seed})}
        _report(args, {"model": source.description, "subset": subset, **result, "epochs": args.epochs,
                       "batch_size": args.batch_size, "base_lr": args.lr, "lr": settings.peak_lr,
                       "steps_per_epoch": len(loader), "image_size": size, "history": history,
                       "checkpoint": str(work_dir / "checkpoint.pt")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
