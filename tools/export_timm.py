"""Export a SMoG backbone to timm: ``python tools/export_timm.py RUN_OR_CHECKPOINT OUT_DIR [--which online]``.

Writes OUT_DIR/model.safetensors (the backbone only, timm's own key names) and OUT_DIR/config.json
(timm's hub format: architecture, num_features, model_args = the recipe's backbone_kwargs, input
size, mean/std, plus a "smog" section with the recipe, the step and the keys left out). Load it with

    timm.create_model(ARCH, pretrained=True, num_classes=0, **MODEL_ARGS,
                      pretrained_cfg_overlay=dict(file="OUT_DIR/model.safetensors"))
    timm.create_model("local-dir:OUT_DIR", pretrained=True, num_classes=0)

(for resnet50x2 / resnet50x4, ``import smog_scale`` first: it registers them). Before
the files are moved into OUT_DIR the export is loaded back through timm and compared with the training
backbone: same keys and tensors, features within 1e-5 on a random batch. Exit code 2 on bad input
(missing files, keys or shapes that do not fit the recipe's architecture) or a failed self-check.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from smog_scale.export import CHECK_TOLERANCE, CheckpointError, export_timm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="export_timm.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="run folder (its newest complete checkpoint) or RUN/checkpoints/step_XXXXXXXX")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="gets model.safetensors and config.json")
    parser.add_argument("--which", choices=("online", "momentum"), default="online",
                        help="encoder whose backbone is exported (default: online, as BYOL and MoCo v3 "
                             "evaluate; the momentum encoder is reset to it at every re-grouping)")
    parser.add_argument("--check-size", type=int, metavar="PX",
                        help="side of the self-check's random images (default: the exported input size; "
                             "smaller is faster for wide ResNets)")
    parser.add_argument("--check-batch", type=int, default=2, metavar="N", help="self-check batch size (default: 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = export_timm(args.source, args.out_dir, args.which, args.check_size, args.check_batch)
    except CheckpointError as err:
        print(f"export_timm: error: {err}", file=sys.stderr)
        return 2
    dropped = ", ".join(f"{prefix}.* ({count} tensors)" for prefix, count in result.dropped.items())
    print(f"exported the {args.which} backbone ({result.architecture}, step {result.step}) to {result.out_dir}")
    print(f"dropped: {dropped or 'nothing'}")
    print(f"self-check: timm reload has the same keys and tensors; max abs feature diff "
          f"{result.max_abs_diff:.3g} (limit {CHECK_TOLERANCE:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
