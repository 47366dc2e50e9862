"""Export of a trained backbone to timm (and, for ResNets, torchvision and detectron2), each file reloaded and checked.

The export is a timm "local-dir" model folder: ``model.safetensors`` (the backbone's own timm keys)
and ``config.json`` in timm's hub format plus a ``smog`` section (recipe, step, dropped keys), so both
``timm.create_model(arch, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=...))`` and
``timm.create_model("local-dir:OUT_DIR", pretrained=True, num_classes=0)`` load it. ``resnet50x2`` /
``resnet50x4`` need ``import smog_scale`` first (it registers them with timm). For detection and
segmentation a ResNet backbone is also written for torchvision (and mmdetection / mmsegmentation) and
for detectron2 (:mod:`smog_scale.export.resnet_formats`). The source is read by :mod:`smog_scale.export.loading`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from smog_scale.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from smog_scale.export import resnet_formats
from smog_scale.export.loading import (
    SHOWN_KEYS,
    CheckpointLoadError,
    Encoder,
    input_side,
    load_backbone,
    load_exported,
    resolve_checkpoint,
    strict_load,
)

CHECK_TOLERANCE = 1e-5  # max abs feature difference allowed between the export and the training backbone

EVAL_CROP_PCT = 0.875  # center crop of data.multicrop.center_view: resize to S / 0.875, crop S



def timm_config(backbone: nn.Module, arch: str, backbone_kwargs: dict[str, Any], trained_side: int,
                interpolation: str, smog: dict[str, Any]) -> dict[str, Any]:
    """config.json in timm's hub format (what ``local-dir:`` reads) plus the ``smog`` section."""
    defaults = cast(dict[str, Any], backbone.pretrained_cfg)  # timm's, a plain dict
    side = input_side(backbone, backbone_kwargs, trained_side)
    pretrained_cfg = {
        "input_size": [3, side, side], "interpolation": interpolation, "crop_pct": EVAL_CROP_PCT,
        "crop_mode": "center", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "num_classes": 0,
        "first_conv": defaults.get("first_conv"), "classifier": defaults.get("classifier"),
        "fixed_input_size": bool(defaults.get("fixed_input_size", False)),
    }
    return {"architecture": arch, "num_classes": 0, "num_features": cast(int, backbone.num_features),
            "model_args": dict(backbone_kwargs), "pretrained_cfg": pretrained_cfg, "smog": smog}



@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    architecture: str
    step: int
    dropped: dict[str, int]  # key prefix -> number of tensors left out of the export
    max_abs_diff: dict[str, float]  # format -> self-check: features (timm, torchvision) or tensors (detectron2)
    files: list[Path]  # written into out_dir
    detectron2_config: dict[str, Any] | None  # the config keys the detectron2 export needs



def export_timm(source: str | Path, out_dir: str | Path, which: Encoder = "online", check_size: int | None = None,
                check_batch: int = 2, formats: Sequence[str] = ("timm",)) -> ExportResult:
    """Write the backbone in each of ``formats`` into ``OUT_DIR``, reload every file and compare.

    ``timm``: ``model.safetensors`` and ``config.json``; ``torchvision``: ``torchvision.pth``;
    ``detectron2``: ``detectron2.pkl`` and ``detectron2.yaml`` (see :mod:`smog_scale.export.resnet_formats`). A format
    the backbone cannot take fails (:class:`resnet_formats.FormatError`) before anything is written. The files
    are written into ``OUT_DIR/.tmp-export`` and moved into place only after every self-check passed:
    timm and torchvision reload the file and give features within ``CHECK_TOLERANCE`` on a random batch
    of ``check_batch`` images of ``check_size`` px (default: the recipe's crop size); detectron2's tensors
    must equal the backbone's.
    """
    unknown = [f for f in formats if f not in resnet_formats.FORMATS]
    if unknown or not formats:
        raise CheckpointLoadError(f"formats {list(formats)}: choose among {list(resnet_formats.FORMATS)}")
    ckpt = resolve_checkpoint(source)
    backbone, dropped = load_backbone(ckpt, which)
    mc = ckpt.model_config
    layout = resnet_formats.resnet_layout(backbone, mc.backbone) if set(formats) - {"timm"} else None
    vision = (resnet_formats.torchvision_resnet(mc.backbone, layout)
              if "torchvision" in formats and layout is not None else None)
    interpolation = ckpt.recipe.get("data", {}).get("crops", [{}])[0].get("interpolation", "bicubic")
    smog = {"source": str(ckpt.path), "step": ckpt.step, "encoder": which, "dropped": dropped, "recipe": ckpt.recipe}
    config = timm_config(backbone, mc.backbone, mc.backbone_kwargs, ckpt.image_size, interpolation, smog)
    size = check_size or config["pretrained_cfg"]["input_size"][-1]
    out_dir = Path(out_dir)
    tmp = out_dir / ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    diffs: dict[str, float] = {}
    d2_config = None
    try:
        if "timm" in formats:
            save_file({k: v.detach().contiguous() for k, v in backbone.state_dict().items()},
                      str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            diffs["timm"] = self_check(backbone, load_exported(tmp), tmp / "model.safetensors", size, check_batch)
        if vision is not None:
            vision_file = tmp / resnet_formats.TORCHVISION_FILE
            resnet_formats.write_torchvision(backbone, vision_file)
            strict_load(vision, torch.load(vision_file, weights_only=True), vision_file,
                        what=f"torchvision.models.{mc.backbone}() without fc")
            diffs["torchvision"] = self_check(backbone, vision, vision_file, size, check_batch)
        if "detectron2" in formats and layout is not None:
            resnet_formats.write_detectron2(backbone, tmp / resnet_formats.DETECTRON2_FILE)
            diffs["detectron2"] = resnet_formats.check_detectron2(backbone, tmp / resnet_formats.DETECTRON2_FILE)
            d2_config = resnet_formats.detectron2_config(layout, (out_dir / resnet_formats.DETECTRON2_FILE).resolve())
            (tmp / resnet_formats.DETECTRON2_CONFIG).write_text(yaml.safe_dump(d2_config, sort_keys=False))
    except (CheckpointLoadError, resnet_formats.FormatError):
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(tmp.iterdir())
    for file in files:
        os.replace(file, out_dir / file.name)
        os.chmod(out_dir / file.name, 0o644)  # safetensors writes 0600; an export is for sharing
    tmp.rmdir()
    return ExportResult(out_dir, mc.backbone, ckpt.step, dropped, diffs, [out_dir / f.name for f in files], d2_config)



@torch.no_grad()
def self_check(backbone: nn.Module, reloaded: nn.Module, file: Path, image_size: int, batch: int = 2) -> float:
    """Raise CheckpointLoadError unless ``reloaded`` (built from ``file``) equals ``backbone``.

    Same keys and tensors, and features within ``CHECK_TOLERANCE`` on a seeded random batch; returns
    the max abs difference of the features.
    """
    saved, got = backbone.state_dict(), reloaded.state_dict()
    missing, unexpected = sorted(set(got) - set(saved)), sorted(set(saved) - set(got))
    differ = [k for k in got if k in saved and not torch.equal(got[k], saved[k])]
    if missing or unexpected or differ:
        raise CheckpointLoadError(f"self-check: the reload of {file} has missing keys {missing[:SHOWN_KEYS]}, "
                              f"unexpected keys {unexpected[:SHOWN_KEYS]}, different tensors {differ[:SHOWN_KEYS]}")
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    diff = float((backbone.eval()(images) - reloaded.eval()(images)).abs().max())
    if not diff <= CHECK_TOLERANCE:
        raise CheckpointLoadError(f"self-check: features of {file} reloaded differ from the training "
                              f"backbone by {diff:.3g} > {CHECK_TOLERANCE}")
    return diff
