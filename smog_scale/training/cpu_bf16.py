"""bf16 on the CPU: refuse a launch whose convolutions would get garbage weight gradients from torch.

torch 2.14.1's CPU (oneDNN) bf16 convolution backward leaves leftover memory in the weight gradient of the kernel
taps that see only zero padding at every output position: values as large as 1e37, inf or NaN, different from run to
run (measured on an AMD EPYC with AVX512-BF16, under ``--mixed_precision bf16`` autocast and under DeepSpeed's bf16
alike). Such a tap's true gradient is 0. Forward, input gradient and the taps that see pixels are right; float32 and
fp16 are right. It struck ResNet's 3x3 stride-2 ``layer4.0.conv1`` on a 1x1 input (16-px crops of ``test_resnet``):
``torch.nn.functional.conv2d`` of a (32, 192, 1, 1) bf16 input, kernel 5, padding 2 gave a non-finite or wrong
weight gradient in 30 of 30 tries. A mask cannot repair it: a tap that sees only padding at one crop size sees
pixels at another, and all crops of a step share one weight gradient. So the trainer refuses such a launch before
any work (exit 2), naming the convolution and the smallest crop size without such taps. The check runs the backbone
on the meta device (shapes only, no compute); GPUs (cuDNN) are not affected and skip it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smog_scale.config.recipe_file import ConfigError
from smog_scale.config.schema import Config
from smog_scale.config.validation import crop_specs
from smog_scale.models.backbone import build_backbone

_LARGEST_SIZE = 1024  # the search for a clean crop size stops here


@dataclass(frozen=True)
class PaddingTaps:
    """A convolution with taps that see only padding at one crop size."""

    name: str
    crop: int
    input_size: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]


def tap_sees_pixels(size: int, kernel: int, stride: int, padding: int, dilation: int) -> list[bool]:
    """For each tap of a 1-D convolution over ``size`` inputs: does some output position put it on an input?"""
    outputs = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    return [any(0 <= o * stride + tap * dilation - padding < size for o in range(outputs)) for tap in range(kernel)]


def _has_padding_only_taps(conv: torch.nn.modules.conv._ConvNd, spatial: tuple[int, ...]) -> bool:
    """Padding the convolution itself adds (what the bug concerns; zeros padded into the input beforehand, as
    timm's Conv2dSame does, are data). ``padding="same"``: torch pads (k - 1) d // 2 a side itself and pads an
    even kernel's one extra zero into the input, which is left out here."""
    padding = conv.padding
    if isinstance(padding, str):
        padding = tuple(0 if padding == "valid" else d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return any(not all(tap_sees_pixels(size, *params))
               for size, *params in zip(spatial, conv.kernel_size, conv.stride, padding, conv.dilation))


def padding_only_taps(backbone: torch.nn.Module, crop: int) -> list[PaddingTaps]:
    """The convolutions of ``backbone`` (on the meta device) with taps that see only padding at ``crop`` px."""
    found: list[PaddingTaps] = []

    def record(name: str):
        def hook(conv: torch.nn.modules.conv._ConvNd, inputs: tuple[torch.Tensor, ...]) -> None:
            spatial = tuple(inputs[0].shape[2:])
            if _has_padding_only_taps(conv, spatial):
                found.append(PaddingTaps(name, crop, spatial, conv.kernel_size, conv.stride))
        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in backbone.named_modules()
               if isinstance(module, torch.nn.modules.conv._ConvNd)]
    try:
        with torch.no_grad():
            backbone(torch.empty(1, 3, crop, crop, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return found


def smallest_clean_crop(backbone: torch.nn.Module, start: int) -> int | None:
    """The smallest multiple of 16 from ``start`` up whose crops give no padding-only taps (None: none found)."""
    for size in range(-(-start // 16) * 16, _LARGEST_SIZE + 1, 16):
        if not padding_only_taps(backbone, size):
            return size
    return None


def refuse_padding_taps(cfg: Config, device: torch.device, precision: str) -> None:
    """ConfigError (exit 2, before any work) for bf16 (``precision``, as Accelerate names it) on the CPU where
    a crop size gives a convolution taps that see only padding (module docstring)."""
    if device.type != "cpu" or precision != "bf16":
        return
    with torch.device("meta"):
        backbone = build_backbone(cfg.model.backbone, **cfg.model.backbone_kwargs).eval()
    sizes = sorted({spec.size for spec in crop_specs(cfg)})
    found = [hit for size in sizes for hit in padding_only_taps(backbone, size)]
    if not found:
        return
    first = found[0]
    shown = "x".join(map(str, first.input_size))
    others = f" and {len(found) - 1} more" if len(found) > 1 else ""
    clean = smallest_clean_crop(backbone, max(hit.crop for hit in found))
    way_out = f"crops of at least {clean} px, " if clean else ""
    raise ConfigError(
        f"bf16 on the CPU: torch's CPU convolution backward in bf16 returns garbage weight gradients for kernel "
        f"taps that see only padding, and {cfg.model.backbone}'s {first.name} has such taps at the {first.crop}-px "
        f"crops (a {shown} input, kernel {first.kernel_size}, stride {first.stride}){others}; use {way_out}"
        f"float32 (run.mixed_precision=no, or launch without --mixed_precision bf16) or a GPU "
        f"(smog_scale/training/cpu_bf16.py says why)")
