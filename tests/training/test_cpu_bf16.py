"""The refusal of bf16 on the CPU where a convolution has taps that see only padding (training/cpu_bf16.py): the
tap arithmetic against autograd, the backbones and recipes it flags or passes, the error it gives, and that the
convolutions it lets through get right bf16 weight gradients from this torch."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from smog_scale.config.recipe_file import ConfigError
from smog_scale.config.validation import load_config
from smog_scale.models.backbone import build_backbone
from smog_scale.training import cpu_bf16
from tests.helpers import BF16_CROPS, ROOT, TINY

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def _conv_cases(count: int, seed: int) -> list[tuple[int, int, int, int, int]]:
    """(size, kernel, stride, padding, dilation) with at least one output position."""
    draw, cases = random.Random(seed), []
    while len(cases) < count:
        size, kernel, stride, dilation = draw.randint(1, 9), draw.randint(1, 7), draw.randint(1, 3), draw.randint(1, 2)
        padding = draw.randint(0, kernel // 2 + 1)
        if size + 2 * padding >= dilation * (kernel - 1) + 1:
            cases.append((size, kernel, stride, padding, dilation))
    return cases


def test_taps_that_see_pixels_are_those_with_a_gradient():
    """A tap sees a pixel iff an all-ones input and output gradient give it a nonzero weight gradient (float64)."""
    for case in _conv_cases(200, seed=0):
        size, kernel, stride, padding, dilation = case
        weight = torch.zeros(1, 1, kernel, dtype=torch.float64, requires_grad=True)
        F.conv1d(torch.ones(1, 1, size, dtype=torch.float64), weight, None, stride, padding, dilation).sum().backward()
        assert cpu_bf16.tap_sees_pixels(*case) == (weight.grad[0, 0] > 0).tolist(), case


def test_test_resnet_has_padding_only_taps_below_48_px():
    with torch.device("meta"):
        backbone = build_backbone("test_resnet").eval()
    assert [(t.name, t.input_size, t.stride) for t in cpu_bf16.padding_only_taps(backbone, 32)] == [
        ("layer4.0.conv1", (2, 2), (2, 2)), ("layer4.0.conv2", (1, 1), (1, 1))]
    assert "layer3.0.conv2" in [t.name for t in cpu_bf16.padding_only_taps(backbone, 16)]
    assert cpu_bf16.padding_only_taps(backbone, 48) == []
    assert cpu_bf16.smallest_clean_crop(backbone, 16) == 48


def test_string_padding_is_read_as_the_padding_torch_adds():
    """``padding="same"`` pads 3 a side for a 7x7 kernel: on a 2x2 input its outer taps see only padding;
    "valid" adds none."""
    with torch.device("meta"):
        same = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 7, padding="same"))
        valid = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, padding="valid"))
    assert [t.name for t in cpu_bf16.padding_only_taps(same, 2)] == ["0"]
    assert cpu_bf16.padding_only_taps(same, 7) == [] and cpu_bf16.padding_only_taps(valid, 1) == []


def test_bf16_on_the_cpu_is_refused_naming_the_convolution_and_the_way_out():
    cfg = load_config(ROOT / "recipes" / "demo_cpu.yaml", TINY)
    with pytest.raises(ConfigError) as refused:
        cpu_bf16.refuse_padding_taps(cfg, CPU, "bf16")
    message = str(refused.value)
    assert "test_resnet's layer3.0.conv2" in message and "16-px crops (a 2x2 input" in message, message
    assert "crops of at least 48 px" in message and "run.mixed_precision=no" in message, message
    for device, precision in ((CPU, "no"), (CPU, "fp16"), (CUDA, "bf16")):
        cpu_bf16.refuse_padding_taps(cfg, device, precision)  # float32, fp16 and cuDNN are right
    cpu_bf16.refuse_padding_taps(load_config(ROOT / "recipes" / "demo_cpu.yaml", TINY + BF16_CROPS), CPU, "bf16")


@pytest.mark.parametrize("recipe", ["r50_mc_400ep", "r50x4", "swin_t_mc"])
def test_the_imagenet_recipes_pass_on_the_cpu_in_bf16(recipe):
    cpu_bf16.refuse_padding_taps(load_config(ROOT / "recipes" / f"{recipe}.yaml", []), CPU, "bf16")


@pytest.mark.parametrize("case", [c for c in _conv_cases(60, seed=1)
                                  if all(cpu_bf16.tap_sees_pixels(*c))][:16])
def test_convolutions_let_through_get_right_bf16_weight_gradients(case):
    """What the refusal leaves to torch is right: where every tap sees a pixel, the CPU's bf16 weight gradient
    matches float64 on the same bf16 values (within bf16's rounding of the 64-term sums)."""
    size, kernel, stride, padding, dilation = case
    x, w = torch.randn(16, 64, size, size).bfloat16(), torch.randn(32, 64, kernel, kernel).bfloat16()
    out = F.conv2d(x.double(), w.double(), None, stride, padding, dilation)
    grad_out = torch.randn_like(out).bfloat16()
    weights = {dtype: w.to(dtype, copy=True).requires_grad_() for dtype in (torch.bfloat16, torch.float64)}
    for dtype, weight in weights.items():
        F.conv2d(x.to(dtype), weight, None, stride, padding, dilation).backward(grad_out.to(dtype))
    low, ref = weights[torch.bfloat16].grad.double(), weights[torch.float64].grad
    torch.testing.assert_close(low, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
