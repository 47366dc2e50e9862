"""Export a SMoG backbone: ``python tools/export_timm.py RUN_OR_CHECKPOINT OUT_DIR [--format timm ...]``.

--format timm (default) writes OUT_DIR/model.safetensors (the backbone only, timm's own key names) and
OUT_DIR/config.json (timm's hub format: architecture, num_features, model_args = the recipe's
backbone_kwargs, input size, mean/std, plus a "smog" section with the recipe, the step and the keys
left out). Load it with

    timm.create_model(ARCH, pretrained=True, num_classes=0, **MODEL_ARGS,
                      pretrained_cfg_overlay=dict(file="OUT_DIR/model.safetensors"))
    timm.create_model("local-dir:OUT_DIR", pretrained=True, num_classes=0)

(for resnet50x2 / resnet50x4, ``import smog_scale`` first: it registers them).

For detection and segmentation (the paper's Tables 5-6), ResNets only:
--format torchvision writes OUT_DIR/torchvision.pth, a state dict with torchvision's names:

    model = torchvision.models.resnet50(); model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load("OUT_DIR/torchvision.pth", weights_only=True))  # strict

mmdetection / mmsegmentation read the same names. torchvision has no constructor for resnet50x2 /
resnet50x4 (its ResNet cannot widen the stage outputs), so they fail here: use timm or detectron2.
--format detectron2 writes OUT_DIR/detectron2.pkl, the pickle detectron2's DetectionCheckpointer reads
(detectron2's names: stem.conv1, res2.0.conv1.norm, res2.0.shortcut ...; "matching_heuristics", as
MoCo's conversion script writes it), and OUT_DIR/detectron2.yaml, the config keys it needs (printed
too): MODEL.WEIGHTS, PIXEL_MEAN/STD and INPUT.FORMAT RGB (our normalization), RESNETS.STRIDE_IN_1X1
False, DEPTH and, for the wide ResNets, STEM_OUT_CHANNELS / RES2_OUT_CHANNELS / WIDTH_PER_GROUP. Merge
it into a detectron2 config with cfg.merge_from_file. Several formats may be given at once.

Before the files are moved into OUT_DIR each is loaded back and compared with the training backbone:
timm and torchvision reload with the same keys and tensors and give features within 1e-5 on a random
batch; the detectron2 pickle holds every tensor under its detectron2 name, unchanged. Exit code 2 on
bad input (missing files, keys or shapes that do not fit the recipe's architecture, a format the
backbone cannot take) or a failed self-check.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smog_scale.export.loading import CheckpointLoadError
from smog_scale.export.resnet_formats import FORMATS, FormatError
from smog_scale.export.timm_export import CHECK_TOLERANCE, export_timm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="export_timm.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="run folder (its newest complete checkpoint) or RUN/checkpoints/step_XXXXXXXX")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="gets the files of each --format")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=["timm"], dest="formats", metavar="FORMAT",
                        help=f"one or more of {', '.join(FORMATS)} (default: timm)")
    parser.add_argument("--which", choices=("online", "momentum"), default="online",
                        help="encoder whose backbone is exported (default: online, as BYOL and MoCo v3 "
                             "evaluate; the momentum encoder is reset to it at every re-grouping)")
    parser.add_argument("--check-size", type=int, metavar="PX",
                        help="side of the self-check's random images (default: the exported input size; "
                             "smaller is faster for wide ResNets)")
    parser.add_argument("--check-batch", type=int, default=2, metavar="N", help="self-check batch size (default: 2)")
    return parser


def _flat(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested config keys as detectron2's dotted names: [("MODEL.RESNETS.DEPTH", 50), ...]."""
    return [pair for key, value in tree.items()
            for pair in (_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix + key, value)])]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = export_timm(args.source, args.out_dir, args.which, args.check_size, args.check_batch,
                             formats=list(dict.fromkeys(args.formats)))
    except (CheckpointLoadError, FormatError) as err:
        print(f"export_timm: error: {err}", file=sys.stderr)
        return 2
    dropped = ", ".join(f"{prefix}.* ({count} tensors)" for prefix, count in result.dropped.items())
    print(f"exported the {args.which} backbone ({result.architecture}, step {result.step}) to {result.out_dir}: "
          + ", ".join(f.name for f in result.files))
    print(f"dropped: {dropped or 'nothing'}")
    for fmt, diff in result.max_abs_diff.items():
        what = "tensors" if fmt == "detectron2" else "features"
        print(f"self-check {fmt}: reloaded, same keys and tensors; max abs {what} diff {diff:.3g} "
              f"(limit {0 if fmt == 'detectron2' else CHECK_TOLERANCE:g})")
    if result.detectron2_config:
        print("detectron2 config keys for these weights (in detectron2.yaml; cfg.merge_from_file reads it):")
        for key, value in _flat(result.detectron2_config):
            print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
