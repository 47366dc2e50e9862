"""Multi-crop views: layout, determinism, and distributions equal to the torchvision recipe."""

from __future__ import annotations

import io
import itertools
import math
import random

import numpy as np
import pytest
import skimage.data
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter

from smog_scale.data.multicrop import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropSpec,
    MultiCrop,
    byol_crops,
    center_view,
    collate_views,
    decode_rgb,
    normalize,
    render_view,
    sample_crop_box,
    sample_view,
)

N = 4000  # parameter draws per distribution check; frequencies are then within ~0.025 at 3 sigma


def _photo_jpeg(width: int, height: int) -> bytes:
    image = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def test_byol_defaults() -> None:
    view_1, view_2, local = byol_crops(num_local=6)
    assert (view_1.size, view_1.count, view_1.scale) == (224, 1, (0.14, 1.0))
    assert (view_1.blur_p, view_1.solarize_p) == (1.0, 0.0)
    assert (view_2.size, view_2.blur_p, view_2.solarize_p) == (224, 0.1, 0.2)
    assert (local.size, local.count, local.scale, local.blur_p, local.solarize_p) == (96, 6, (0.05, 0.14), 0.5, 0.0)
    for spec in (view_1, view_2, local):
        assert (spec.brightness, spec.contrast, spec.saturation, spec.hue) == (0.4, 0.4, 0.2, 0.1)
        assert (spec.jitter_p, spec.grayscale_p, spec.flip_p, spec.blur_sigma) == (0.8, 0.2, 0.5, (0.1, 2.0))
    assert len(byol_crops()) == 2


@pytest.mark.parametrize("field, value", [("size", 0), ("count", 0), ("scale", (0.5, 0.2)), ("scale", (0.0, 1.0)),
                                          ("blur_p", 1.5), ("hue", 0.7), ("interpolation", "nearest")])
def test_invalid_spec_fails_at_construction(field: str, value: object) -> None:
    with pytest.raises(ValueError, match="invalid CropSpec"):
        CropSpec(**{field: value})


def test_views_shapes_dtypes_ranges() -> None:
    crops = byol_crops(num_local=6, global_size=32, local_size=16)
    views = MultiCrop(crops)(_photo_jpeg(120, 90), random.Random(0))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 6
    for view in views:
        assert view.dtype == torch.uint8
        assert int(view.max()) - int(view.min()) > 20  # an image, not a constant


def test_same_seed_same_views() -> None:
    transform, data = MultiCrop(byol_crops(num_local=2, global_size=24, local_size=12)), _photo_jpeg(80, 60)
    first, second = transform(data, random.Random(5)), transform(data, random.Random(5))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    other = transform(data, random.Random(6))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def _boxes_ours(width: int, height: int, scale: tuple, ratio: tuple) -> np.ndarray:
    rng = random.Random(0)
    return np.array([sample_crop_box(width, height, scale, ratio, rng) for _ in range(N)], dtype=float)


def _boxes_torchvision(width: int, height: int, scale: tuple, ratio: tuple) -> np.ndarray:
    torch.manual_seed(0)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    return np.array([T.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(N)], dtype=float)


@pytest.mark.parametrize("width, height", [(500, 375), (375, 500), (64, 16)])
@pytest.mark.parametrize("scale", [(0.14, 1.0), (0.05, 0.14)])
def test_crop_boxes_match_random_resized_crop(width: int, height: int, scale: tuple) -> None:
    """Same box distribution as torchvision's RandomResizedCrop (64x16 exercises the fallback)."""
    ratio = (3 / 4, 4 / 3)
    ours, reference = _boxes_ours(width, height, scale, ratio), _boxes_torchvision(width, height, scale, ratio)
    for boxes in (ours, reference):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    quantiles = np.linspace(0.05, 0.95, 7)
    for name, of in _BOX_STATISTICS.items():
        a, b = of(ours, width, height), of(reference, width, height)
        resolution = 1.0 if name in ("top", "left", "height", "width") else 0.01  # pixels are integers
        gap = np.abs(np.quantile(a, quantiles) - np.quantile(b, quantiles)).max()
        assert gap <= max(0.05 * (b.max() - b.min()), resolution), (name, gap)


_BOX_STATISTICS = {
    "top": lambda boxes, width, height: boxes[:, 0],
    "left": lambda boxes, width, height: boxes[:, 1],
    "height": lambda boxes, width, height: boxes[:, 2],
    "width": lambda boxes, width, height: boxes[:, 3],
    "area fraction": lambda boxes, width, height: boxes[:, 2] * boxes[:, 3] / (width * height),
    "log aspect": lambda boxes, width, height: np.log(boxes[:, 3] / boxes[:, 2]),
}


def _draw_params(spec: CropSpec) -> list:
    rng = random.Random(1)
    return [sample_view(spec, 500, 375, rng) for _ in range(N)]


@pytest.mark.parametrize("spec", byol_crops(num_local=6), ids=["view1", "view2", "local"])
def test_photometric_parameters_match_torchvision(spec: CropSpec) -> None:
    reference = T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
    blur = T.GaussianBlur(23, spec.blur_sigma)
    params = _draw_params(spec)
    jittered = [p for p in params if p.jitter]
    assert len(jittered) / N == pytest.approx(spec.jitter_p, abs=0.03)
    for op, bounds in enumerate((reference.brightness, reference.contrast, reference.saturation, reference.hue)):
        factors = np.array([f for p in jittered for o, f in p.jitter if o == op])
        assert len(factors) == len(jittered)  # every op of a jittered view is applied
        assert bounds[0] <= factors.min() < bounds[0] + 0.02 and bounds[1] - 0.02 < factors.max() <= bounds[1]
    orders = {tuple(o for o, _ in p.jitter) for p in jittered}
    assert orders == set(itertools.permutations(range(4)))  # random order, as ColorJitter
    sigmas = np.array([p.blur_sigma for p in params if p.blur_sigma is not None])
    assert len(sigmas) / N == pytest.approx(spec.blur_p, abs=0.03)
    assert blur.sigma[0] <= sigmas.min() < blur.sigma[0] + 0.05
    assert blur.sigma[1] - 0.05 < sigmas.max() <= blur.sigma[1]
    for name, p in (("grayscale", spec.grayscale_p), ("solarize", spec.solarize_p), ("flip", spec.flip_p)):
        assert np.mean([getattr(q, name) for q in params]) == pytest.approx(p, abs=0.03), name


def test_zero_strength_jitter_ops_are_skipped_like_torchvision() -> None:
    params = _draw_params(CropSpec(hue=0.0, jitter_p=1.0))
    assert all(sorted(o for o, _ in p.jitter) == [0, 1, 2] for p in params)


@pytest.mark.parametrize("sigma", [0.3, 0.5, 1.0, 1.5, 2.0])
def test_pil_blur_radius_is_the_gaussian_sigma(sigma: float) -> None:
    """PIL's radius is the standard deviation: a blurred line spreads with variance sigma^2."""
    line = np.zeros((25, 81), np.uint8)
    line[:, 40] = 255
    profile = np.asarray(Image.fromarray(line).filter(ImageFilter.GaussianBlur(radius=sigma)), dtype=float)[12]
    x = np.arange(81) - 40
    variance = (profile * x**2).sum() / profile.sum()
    assert variance == pytest.approx(sigma**2, abs=0.01 + 0.01 * sigma**2)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.0])
def test_pil_blur_matches_torchvision_gaussian_blur_23(sigma: float) -> None:
    image = Image.fromarray(skimage.data.astronaut()).resize((96, 96))
    ours = np.asarray(image.filter(ImageFilter.GaussianBlur(radius=sigma)), dtype=float)
    reference = TF.gaussian_blur(TF.pil_to_tensor(image), [23, 23], [sigma, sigma]).permute(1, 2, 0).numpy()
    assert np.abs(ours - reference).mean() < 1.0  # gray levels; the blur itself moves pixels by 2-13


def test_draft_decode_keeps_the_sampled_distribution() -> None:
    data = _photo_jpeg(800, 600)
    spec = CropSpec(size=64, scale=(0.3, 1.0))
    image, size, scale = decode_rgb(data, min_area=spec.min_decode_area)
    assert size == (800, 600) and scale == 0.25 and image.size == (200, 150)
    assert image.size[0] * image.size[1] >= spec.min_decode_area
    full, _, _ = decode_rgb(data)
    params = sample_view(CropSpec(size=64, scale=(0.3, 1.0), jitter_p=0, grayscale_p=0, blur_p=0), 800, 600,
                         random.Random(0))
    drafted, reference = render_view(image, spec, params, scale), render_view(full, spec, params)
    assert (drafted.float() - reference.float()).abs().mean() < 3.0  # same content, same crop
    assert decode_rgb(data, min_area=400 * 300 + 1)[2] == 1.0  # a 1/2 decode would be too small


def test_collate_views_groups_by_size() -> None:
    sizes = [16, 16, 8, 8, 8]
    samples = [{"crops": [torch.full((3, s, s), 10 * b + v, dtype=torch.uint8) for v, s in enumerate(sizes)],
                "cls": b, "key": f"k{b}"} for b in range(3)]
    batch = collate_views(samples)
    assert [tuple(c.shape) for c in batch["crops"]] == [(2, 3, 3, 16, 16), (3, 3, 3, 8, 8)]
    assert int(batch["crops"][0][1, 2, 0, 0, 0]) == 21 and int(batch["crops"][1][2, 1, 0, 0, 0]) == 14
    assert batch["cls"].tolist() == [0, 1, 2] and batch["cls"].dtype == torch.long
    assert batch["key"] == ["k0", "k1", "k2"]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_normalize(device: str) -> None:
    images = torch.randint(0, 256, (2, 4, 3, 8, 8), dtype=torch.uint8, device=device)
    out = normalize(images)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    assert out.shape == images.shape and out.dtype == torch.float32 and out.device == images.device
    torch.testing.assert_close(out, (images.float() / 255 - mean) / std)  # 3 roundings a side: float32 defaults
    assert normalize(images, torch.bfloat16).dtype == torch.bfloat16


def test_center_view() -> None:
    view = center_view(_photo_jpeg(90, 60), image_size=32)
    assert view.shape == (3, 32, 32) and view.dtype == torch.float32
    assert -2.2 < float(view.min()) < float(view.max()) < 2.7 and not math.isclose(float(view.std()), 0.0)


def test_center_view_takes_an_image_at_the_evaluation_size_as_it_is() -> None:
    """A 32-px image evaluated at 32 px is not zoomed (resized to 37, cropped to 32): its pixels come through."""
    pixels = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    view = center_view(out.getvalue(), image_size=32)
    expected = normalize(torch.from_numpy(pixels[:, 4:36]).permute(2, 0, 1).contiguous())
    torch.testing.assert_close(view, expected)  # the same normalization of the same bytes: exact
