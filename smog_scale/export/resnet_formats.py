"""A ResNet backbone for detection and segmentation: torchvision's and detectron2's key layouts.

timm's ResNets keep torchvision's names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``),
so the **torchvision** file is the backbone's own state dict, saved with ``torch.save``:
``torchvision.models.resnet50()`` loads it with ``strict=True`` once its ``fc`` is removed (mmdetection and
mmsegmentation read the same names). The **detectron2** file is the pickle that detectron2's
``DetectionCheckpointer`` reads, in the layout MoCo's ``convert-pretrain-to-detectron2.py`` writes:
``{"model": {name: ndarray}, "__author__": ..., "matching_heuristics": True}`` with detectron2's ResNet
names (``stem.conv1``, ``stem.conv1.norm``, ``res2.0.conv1``, ``res2.0.conv1.norm``, ``res2.0.shortcut``,
``res2.0.shortcut.norm``; ``layerN`` is ``res{N+1}``); BN's ``num_batches_tracked`` counters are left out
(detectron2's FrozenBN has none). detectron2 builds the ResNet from its config, so the export also writes
the config keys that make it match these weights (``detectron2.yaml``): depth, stem and stage widths,
``STRIDE_IN_1X1: False`` (timm, like torchvision, strides in the 3x3 convolution) and our RGB input
normalization.

Only ResNets with torchvision's layout convert: a 7x7 stem, plain BasicBlock / Bottleneck stages whose
widths double per stage, BatchNorm. Anything else (Swin, ResNet-D's average-pool shortcut, SE blocks,
GroupNorm, a deep stem) fails with :class:`FormatError` naming the first module that does not fit.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from timm.layers import DropPath, SelectAdaptivePool2d
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from smog_scale import __version__
from smog_scale.data.multicrop import IMAGENET_MEAN, IMAGENET_STD

FORMATS = ("timm", "torchvision", "detectron2")
TORCHVISION_FILE = "torchvision.pth"
DETECTRON2_FILE = "detectron2.pkl"  # detectron2 reads a checkpoint as a pickle only when its name ends in .pkl
DETECTRON2_CONFIG = "detectron2.yaml"
# Blocks per stage -> MODEL.RESNETS.DEPTH, as detectron2's build_resnet_backbone tabulates them.
DETECTRON2_DEPTHS: dict[tuple[str, tuple[int, ...]], int] = {
    ("basic", (2, 2, 2, 2)): 18, ("basic", (3, 4, 6, 3)): 34, ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101, ("bottleneck", (3, 8, 36, 3)): 152}
_PLAIN_MODULES = (ResNet, nn.Sequential, BasicBlock, Bottleneck, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
                  nn.Identity, SelectAdaptivePool2d, nn.AdaptiveAvgPool2d, nn.Flatten, DropPath)
_TIMM_KEY = re.compile(r"(?:(?P<stem>conv1|bn1)|layer(?P<stage>[1-4])\.(?P<block>\d+)\."
                       r"(?P<layer>conv[1-3]|bn[1-3]|downsample\.[01]))\.(?P<param>\w+)")


class FormatError(ValueError):
    """A backbone that the asked format cannot hold; the message names the module or key in the way."""


@dataclass(frozen=True)
class ResNetLayout:
    """What detectron2's config must say to build the ResNet whose weights are exported."""

    block: str  # "basic" (ResNet-18/34) or "bottleneck"
    blocks: tuple[int, ...]  # blocks per stage
    stem_channels: int  # MODEL.RESNETS.STEM_OUT_CHANNELS
    res2_out_channels: int  # MODEL.RESNETS.RES2_OUT_CHANNELS
    num_groups: int  # MODEL.RESNETS.NUM_GROUPS (grouped 3x3 convolutions, ResNeXt)
    width_per_group: int  # MODEL.RESNETS.WIDTH_PER_GROUP: the first stage's bottleneck width / groups

    @property
    def depth(self) -> int:
        return DETECTRON2_DEPTHS[(self.block, self.blocks)]


def resnet_layout(backbone: nn.Module, arch: str) -> ResNetLayout:
    """The layout of a timm ResNet with torchvision's structure; FormatError for anything else."""
    hint = f"{arch}: --format torchvision and detectron2 take ResNets with torchvision's layout; use --format timm"
    if not isinstance(backbone, ResNet):
        raise FormatError(f"{hint} ({type(backbone).__name__} is not a ResNet)")
    for name, module in backbone.named_modules():
        if type(module) not in _PLAIN_MODULES:
            raise FormatError(f"{hint} (module {name!r}: {type(module).__name__})")
        if isinstance(module, nn.Conv2d) and module.dilation != (1, 1):
            raise FormatError(f"{hint} (module {name!r} is dilated)")
    shapes = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    odd = [k for k in shapes if not _TIMM_KEY.fullmatch(k)]
    if odd:
        raise FormatError(f"{hint} (key {odd[0]!r})")
    block = "bottleneck" if "layer1.0.conv3.weight" in shapes else "basic"
    blocks = tuple(len({k.split(".")[1] for k in shapes if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    if (block, blocks) not in DETECTRON2_DEPTHS:
        raise FormatError(f"{arch}: {blocks} {block} blocks per stage is none of detectron2's depths 18/34/50/101/152")
    last = "conv3" if block == "bottleneck" else "conv2"
    width = shapes["layer1.0.conv1.weight"][0]
    groups = width // shapes["layer1.0.conv2.weight"][1]  # a grouped 3x3 convolution sees width / groups inputs
    layout = ResNetLayout(block, blocks, shapes["conv1.weight"][0], shapes[f"layer1.0.{last}.weight"][0], groups,
                          width // groups)
    for stage in range(2, 5):  # detectron2 doubles the bottleneck and output widths at every stage
        got = (shapes[f"layer{stage}.0.conv1.weight"][0], shapes[f"layer{stage}.0.{last}.weight"][0])
        if got != (width * 2 ** (stage - 1), layout.res2_out_channels * 2 ** (stage - 1)):
            raise FormatError(f"{arch}: layer{stage} has widths {got}; detectron2's ResNet doubles "
                              f"({width}, {layout.res2_out_channels}) per stage")
    return layout


def detectron2_key(timm_key: str) -> str | None:
    """detectron2's name for a timm ResNet key (None for BN's ``num_batches_tracked``), e.g.
    ``layer1.0.bn2.weight -> res2.0.conv2.norm.weight``, ``layer2.0.downsample.1.bias -> res3.0.shortcut.norm.bias``."""
    match = _TIMM_KEY.fullmatch(timm_key)
    if match is None:
        raise FormatError(f"{timm_key!r} is not a key of a ResNet with torchvision's layout")
    if match["param"] == "num_batches_tracked":
        return None
    if match["stem"]:
        return f"stem.conv1.{'norm.' if match['stem'] == 'bn1' else ''}{match['param']}"
    layer = match["layer"]
    name = "shortcut" if layer.startswith("downsample") else "conv" + layer[-1]
    norm = "norm." if layer.startswith("bn") or layer == "downsample.1" else ""
    return f"res{int(match['stage']) + 1}.{match['block']}.{name}.{norm}{match['param']}"


def detectron2_config(layout: ResNetLayout, weights: Path) -> dict[str, Any]:
    """The detectron2 config keys these weights need (merge into a model config with ``cfg.merge_from_file``)."""
    return {
        "MODEL": {
            "WEIGHTS": str(weights),
            "PIXEL_MEAN": [round(255 * m, 3) for m in IMAGENET_MEAN],
            "PIXEL_STD": [round(255 * s, 3) for s in IMAGENET_STD],
            "RESNETS": {"DEPTH": layout.depth, "STRIDE_IN_1X1": False, "STEM_OUT_CHANNELS": layout.stem_channels,
                        "RES2_OUT_CHANNELS": layout.res2_out_channels, "NUM_GROUPS": layout.num_groups,
                        "WIDTH_PER_GROUP": layout.width_per_group},
        },
        "INPUT": {"FORMAT": "RGB"},
    }


class _PortablePickler(pickle.Pickler):
    """Pickles an ndarray as ``numpy.ndarray(shape, dtype, buffer)``. NumPy 2's own reduction names
    ``numpy._core``, which the NumPy 1.x of many detectron2 installs cannot import."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return np.ndarray, (obj.shape, obj.dtype.str, bytearray(np.ascontiguousarray(obj).tobytes()))
        return NotImplemented


def write_detectron2(backbone: nn.Module, file: Path) -> None:
    """``file`` (a .pkl): the backbone's tensors under detectron2's names, as float32/int64 ndarrays."""
    model = {}
    for key, tensor in backbone.state_dict().items():
        name = detectron2_key(key)
        if name is not None:
            model[name] = tensor.detach().cpu().numpy()
    with open(file, "wb") as f:
        _PortablePickler(f, protocol=4).dump(
            {"model": model, "__author__": f"smog_scale {__version__}", "matching_heuristics": True})


def check_detectron2(backbone: nn.Module, file: Path) -> float:
    """Reread ``file`` as detectron2 does (plain pickle, latin1) and compare every tensor with ``backbone``'s.

    Returns the max abs difference (0 when exact); raises FormatError on a missing, extra or different tensor.
    """
    with open(file, "rb") as f:
        stored = pickle.load(f, encoding="latin1")["model"]
    renamed = {detectron2_key(k): v for k, v in backbone.state_dict().items()}
    expected = {k: v for k, v in renamed.items() if k is not None}
    if set(stored) != set(expected):
        raise FormatError(f"self-check: {file} holds {sorted(set(stored) ^ set(expected))[:8]} unlike the backbone")
    diff = max(float((torch.from_numpy(stored[k]) - v.cpu()).abs().max()) for k, v in expected.items())
    if diff != 0.0:
        raise FormatError(f"self-check: tensors of {file} differ from the backbone's by {diff:.3g}")
    return diff


def torchvision_resnet(arch: str, layout: ResNetLayout) -> nn.Module:
    """``torchvision.models.<arch>()`` without its classifier (``fc`` is an Identity), eval mode."""
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise FormatError(
            f"{arch}: torchvision has no constructor of that name, and its ResNet class cannot build this one (it "
            f"gives stage 1 {64 if layout.block == 'basic' else 256} output channels at any width, {arch} has "
            f"{layout.res2_out_channels}); use --format timm or detectron2")
    model = torchvision.models.get_model(arch, weights=None)
    model.fc = nn.Identity()
    return model.eval()


def write_torchvision(backbone: nn.Module, file: Path) -> None:
    """``file``: the backbone's state dict (torchvision's names; no ``fc``) for ``torch.load(weights_only=True)``."""
    torch.save({k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}, file)
