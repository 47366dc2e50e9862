"""Grouping quality (Fig. 5 of SMoG): ``[accelerate launch] tools/group_quality.py RUN_OR_CHECKPOINT SHARDS OUT_DIR``.

Every labelled sample of SHARDS (center crop) goes through the checkpoint's momentum (or online)
encoder, backbone and projector; its L2-normalized feature is assigned to the most cosine-similar of
the checkpoint's groups G. For each group the entropy of its members' classes, sum_c -p_c log p_c
(nats), says how semantic it is: lower is better. Writes

    OUT_DIR/group_quality.json  summary: non-empty groups, mean entropy (plain and size-weighted),
                                the same for shuffled labels (chance level), per-group sizes and entropies
    OUT_DIR/group_quality.png   histogram of the per-group entropies like Fig. 5, and of the group sizes

Multi-process through Accelerate (each process reads its share of SHARDS). Exit code 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from accelerate import Accelerator

from smog_scale import dist
from smog_scale.data.shards import ShardOpenError, build_eval_loader, read_manifest
from smog_scale.eval.group_quality import group_assignments, group_quality
from smog_scale.eval.plots import plot_group_quality
from smog_scale.export.loading import CheckpointLoadError, input_side, load_groups, load_model, resolve_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="group_quality.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="run folder or checkpoint directory")
    parser.add_argument("shards", metavar="SHARDS",
                        help="labelled shards, e.g. /data/in1k-val/in1k-val-{000000..000049}.tar")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="gets group_quality.json and group_quality.png")
    parser.add_argument("--features", choices=("momentum", "online"), default="momentum",
                        help="encoder whose projector features are assigned (default: momentum, as the "
                             "training labels are; docs/method.md step 1)")
    parser.add_argument("--image-size", type=int, metavar="PX", help="center-crop side (default: the training crop)")
    parser.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per process (default: 256)")
    parser.add_argument("--workers", type=int, default=8, metavar="N", help="loader workers per process (default: 8)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    accelerator = Accelerator()
    try:
        ckpt = resolve_checkpoint(args.source)
        model, groups = load_model(ckpt), load_groups(ckpt)
        encoder = getattr(model, args.features).to(accelerator.device)
        size = args.image_size or input_side(encoder.backbone, ckpt.model_config.backbone_kwargs, ckpt.image_size)
        loader = build_eval_loader(args.shards, image_size=size, batch_size=args.batch_size,
                                   num_workers=args.workers, rank=dist.rank(), world_size=dist.world_size())
        assignments, labels = group_assignments(encoder, groups, loader, accelerator)
    except (CheckpointLoadError, ShardOpenError, FileNotFoundError) as err:
        print(f"group_quality: error: {err}", file=sys.stderr)
        return 2
    try:
        num_classes = max(len(read_manifest(args.shards)["classes"]), int(labels.max()) + 1)
    except (FileNotFoundError, ValueError, KeyError):
        num_classes = int(labels.max()) + 1
    summary = {"source": str(ckpt.path), "step": ckpt.step, "features": args.features,
               **group_quality(assignments, labels, len(groups), num_classes)}
    if accelerator.is_main_process:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "group_quality.json").write_text(json.dumps(summary, indent=1))
        plot_group_quality(summary, args.out_dir / "group_quality.png",
                           title=f"group entropy, {ckpt.path.parent.parent.name} step {ckpt.step} "
                                 f"({args.features} features); lower is better")
        print(f"{summary['non_empty_groups']} of {len(groups)} groups non-empty over {summary['num_samples']} samples; "
              f"mean group entropy {summary['mean_entropy']:.3f} nats (size-weighted "
              f"{summary['weighted_mean_entropy']:.3f}; shuffled labels {summary['chance_mean_entropy']:.3f}, "
              f"max log C = {summary['max_entropy']:.3f}); wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
