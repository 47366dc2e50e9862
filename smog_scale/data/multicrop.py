"""Multi-crop augmentation declared as crop records, per-resolution collation and normalization.

The views feed docs/method.md "One training step": the global views a, b and the optional local
views. The recipe is BYOL's asymmetric one (Grill et al. 2020, table 6) with SwAV/DINO local
crops; every knob is a :class:`CropSpec` field. Each sample is decoded once and stays uint8 until
:func:`normalize`, which the trainer calls on the device.

Speed, with the distributions unchanged from the torchvision recipe:

* Decoding uses PIL (libjpeg-turbo). ``torchvision.io.decode_jpeg`` decodes about as fast, but
  the colour ops that follow are cheaper on PIL images than on tensors (hue 2x, saturation 2x).
* When a JPEG is so large that even the smallest crop would be downscaled, it is decoded at a
  reduced size with PIL's ``draft`` (DCT-domain 1/2, 1/4, 1/8 scaling). Crop boxes are sampled on
  the original size and mapped onto the decoded image, so the sampled distribution is exactly the
  unreduced one; ``scale`` is an area fraction, so only resolution, never content, changes.
* The Gaussian blur is PIL's ``ImageFilter.GaussianBlur`` (three extended box blurs with the
  exact Gaussian variance; its ``radius`` argument IS the standard deviation). torchvision's
  ``GaussianBlur(23, sigma)`` samples the same sigma but convolves a 23-tap float kernel, which is
  ~10x slower; with sigma <= 2 the 23-tap truncation is at >= 5.5 sigma, so both blur alike
  (``tests/data/test_multicrop.py`` checks the variance and the pixel difference).
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
# ColorJitter's four ops; a view applies them in a random order, as torchvision.ColorJitter does.
_JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


@dataclass(frozen=True)
class CropSpec:
    """``count`` views of one kind: a random resized crop to ``size`` plus photometric ops.

    Defaults are BYOL's view-1 recipe at 224 px; :func:`byol_crops` builds the full set.

    Attributes:
        size: output side in pixels (square). Global 224, local 96 (SwAV/DINO).
        count: number of views drawn with this record.
        scale: crop area as a fraction of the image area, as in ``RandomResizedCrop``. Global
            (0.14, 1.0); local (0.05, 0.14). Overlapping global/local ranges make the local task
            easier; too small a lower bound (< 0.05 at 96 px) gives crops with no object in them.
        ratio: aspect-ratio range of the crop (log-uniform), torchvision's (3/4, 4/3).
        flip_p: probability of a horizontal flip.
        jitter_p: probability of applying colour jitter at all (BYOL 0.8).
        brightness, contrast, saturation: jitter strengths x; factors uniform in [max(0,1-x), 1+x].
        hue: hue jitter strength; shift uniform in [-hue, hue], at most 0.5.
        grayscale_p: probability of converting to 3-channel grayscale (BYOL 0.2).
        blur_p: probability of a Gaussian blur (BYOL 1.0 / 0.1 for views 1 / 2; DINO's local 0.5).
        blur_sigma: range of the blur's standard deviation, uniform (BYOL 0.1..2.0 px at 224).
        solarize_p: probability of solarization (BYOL 0.0 / 0.2).
        solarize_threshold: uint8 values >= this are inverted (128 = BYOL's 0.5).
        interpolation: "bicubic" (BYOL, DINO) or "bilinear" (torchvision's default).
    """

    size: int = 224
    count: int = 1
    scale: tuple[float, float] = (0.14, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: int = 128
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        """Validate once so that a bad recipe fails at start-up, not inside a worker."""
        object.__setattr__(self, "scale", tuple(self.scale))
        object.__setattr__(self, "ratio", tuple(self.ratio))
        object.__setattr__(self, "blur_sigma", tuple(self.blur_sigma))
        checks = {
            "size must be positive": self.size > 0,
            "count must be >= 1": self.count >= 1,
            "scale must satisfy 0 < lo <= hi <= 1": 0 < self.scale[0] <= self.scale[1] <= 1,
            "ratio must satisfy 0 < lo <= hi": 0 < self.ratio[0] <= self.ratio[1],
            "blur_sigma must satisfy 0 < lo <= hi": 0 < self.blur_sigma[0] <= self.blur_sigma[1],
            "hue must be in [0, 0.5]": 0 <= self.hue <= 0.5,
            "brightness/contrast/saturation must be >= 0": min(self.brightness, self.contrast, self.saturation) >= 0,
            "solarize_threshold must be in [0, 256]": 0 <= self.solarize_threshold <= 256,
            f"interpolation must be one of {sorted(_RESAMPLE)}": self.interpolation in _RESAMPLE,
        }
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            checks[f"{name} must be a probability"] = 0 <= getattr(self, name) <= 1
        errors = [message for message, ok in checks.items() if not ok]
        if errors:
            raise ValueError(f"invalid CropSpec {self}: " + "; ".join(errors))

    @property
    def min_decode_area(self) -> float:
        """Pixel area below which the smallest, narrowest crop of this record gets upscaled."""
        narrowest = min(self.ratio[0], 1 / self.ratio[1], 1.0)
        return self.size**2 / (self.scale[0] * narrowest)


def byol_crops(
    num_local: int = 0,
    *,
    global_size: int = 224,
    global_scale: tuple[float, float] = (0.14, 1.0),
    local_size: int = 96,
    local_scale: tuple[float, float] = (0.05, 0.14),
) -> tuple[CropSpec, ...]:
    """The SMoG/BYOL crop set: two asymmetric global views, then ``num_local`` local views.

    View 1 always blurs and never solarizes; view 2 blurs with p 0.1 and solarizes with p 0.2
    (BYOL). Local views blur with p 0.5 and never solarize, as DINO's local crops do. Use
    ``num_local=0`` for the two-view recipes and 6 for multi-crop (SMoG's 2x224 + 6x96).
    """
    view_1 = CropSpec(size=global_size, scale=global_scale, blur_p=1.0, solarize_p=0.0)
    view_2 = CropSpec(size=global_size, scale=global_scale, blur_p=0.1, solarize_p=0.2)
    if num_local == 0:
        return (view_1, view_2)
    local = CropSpec(size=local_size, count=num_local, scale=local_scale, blur_p=0.5, solarize_p=0.0)
    return (view_1, view_2, local)


@dataclass(frozen=True)
class ViewParams:
    """The random choices for one view; sampled by :func:`sample_view`, applied by :func:`render_view`.

    ``box`` is (top, left, height, width) in pixels of the ORIGINAL image, exactly what
    ``torchvision.transforms.RandomResizedCrop.get_params`` returns. ``jitter`` lists
    (op index into brightness/contrast/saturation/hue, factor) in application order, or is empty.
    """

    box: tuple[int, int, int, int]
    flip: bool
    jitter: tuple[tuple[int, float], ...]
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


def sample_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` drawn from ``rng`` (torchvision's draws the global torch RNG).

    Same algorithm: 10 tries of (area fraction uniform in ``scale``, log-uniform ratio), then a
    central crop clamped to ``ratio``. Returns (top, left, height, width).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_view(spec: CropSpec, width: int, height: int, rng: random.Random) -> ViewParams:
    """Draw one view's parameters with torchvision's distributions (RandomApply: apply if u < p)."""
    box = sample_crop_box(width, height, spec.scale, spec.ratio, rng)
    flip = rng.random() < spec.flip_p
    jitter: tuple[tuple[int, float], ...] = ()
    if rng.random() < spec.jitter_p:
        ranges = [
            (max(0.0, 1 - spec.brightness), 1 + spec.brightness),
            (max(0.0, 1 - spec.contrast), 1 + spec.contrast),
            (max(0.0, 1 - spec.saturation), 1 + spec.saturation),
            (-spec.hue, spec.hue),
        ]
        strengths = (spec.brightness, spec.contrast, spec.saturation, spec.hue)
        order = rng.sample(range(4), 4)
        jitter = tuple((op, rng.uniform(*ranges[op])) for op in order if strengths[op] > 0)
    grayscale = rng.random() < spec.grayscale_p
    blur_sigma = rng.uniform(*spec.blur_sigma) if rng.random() < spec.blur_p else None
    solarize = rng.random() < spec.solarize_p
    return ViewParams(box, flip, jitter, grayscale, blur_sigma, solarize)


def render_view(image: Image.Image, spec: CropSpec, params: ViewParams, decode_scale: float = 1.0) -> torch.Tensor:
    """Apply ``params`` to a decoded RGB image; returns uint8 (3, size, size).

    ``decode_scale`` is decoded size / original size (< 1 after a draft decode); the crop box,
    drawn on the original, is mapped onto the decoded pixels as a float box, which PIL's resize
    takes directly (torchvision's ``resized_crop`` only takes integer boxes).
    """
    top, left, h, w = (v * decode_scale for v in params.box)
    view = image.resize((spec.size, spec.size), _RESAMPLE[spec.interpolation], box=(left, top, left + w, top + h))
    if params.flip:
        view = TF.horizontal_flip(view)
    for op, factor in params.jitter:
        view = _JITTER_OPS[op](view, factor)
    if params.grayscale:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    if params.blur_sigma is not None:
        view = view.filter(ImageFilter.GaussianBlur(radius=params.blur_sigma))  # radius == sigma
    if params.solarize:
        view = TF.solarize(view, spec.solarize_threshold)
    return TF.pil_to_tensor(view)


def decode_rgb(
    data: bytes, min_area: float = 0.0, min_short_side: int = 0
) -> tuple[Image.Image, tuple[int, int], float]:
    """Decode image bytes to RGB, reducing a large JPEG with ``draft`` where that loses nothing.

    The decoded image keeps >= ``min_area`` pixels and a short side >= ``min_short_side`` (both 0:
    always full size). Returns (image, (original width, original height), decoded / original scale).
    """
    image = Image.open(io.BytesIO(data))
    size = image.size
    shrink = max(math.sqrt(min_area / (size[0] * size[1])), min_short_side / min(size))
    scale = 1.0
    if 0 < shrink <= 0.5 and image.format == "JPEG":
        drafted = image.draft("RGB", (math.ceil(size[0] * shrink), math.ceil(size[1] * shrink)))
        if drafted is not None:
            scale = drafted[1][2] / size[0]
    if image.mode != "RGB":
        return image.convert("RGB"), size, scale
    image.load()  # decode here, so a corrupt image fails in this call; convert() would also copy
    return image, size, scale


class MultiCrop:
    """Bytes -> one uint8 (3, S, S) tensor per view, in declaration order; decodes once.

    Args:
        crops: the crop records; views of equal size are later batched together by
            :func:`collate_views`, so declare the global views first.
        draft: allow reduced-size JPEG decoding when no crop would be upscaled because of it.
    """

    def __init__(self, crops: Sequence[CropSpec], *, draft: bool = True) -> None:
        if not crops:
            raise ValueError("MultiCrop needs at least one CropSpec")
        self.crops = tuple(crops)
        self.min_decode_area = max(spec.min_decode_area for spec in self.crops) if draft else 0.0

    def __call__(self, data: bytes, rng: random.Random) -> list[torch.Tensor]:
        """Decode ``data`` and draw every view with ``rng``."""
        image, (width, height), scale = decode_rgb(data, self.min_decode_area)
        views = []
        for spec in self.crops:
            for _ in range(spec.count):
                views.append(render_view(image, spec, sample_view(spec, width, height, rng), scale))
        return views


def collate_views(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch samples ``{"crops": [views], "cls": int, "key": str}`` into per-resolution tensors.

    Returns ``{"crops": [uint8 [V_s, B, 3, S, S] per distinct size S in order of first
    appearance], "cls": LongTensor[B], "key": list[str]}``; views of one size keep their order.
    """
    groups: dict[int, list[int]] = {}
    for index, view in enumerate(samples[0]["crops"]):
        groups.setdefault(view.shape[-1], []).append(index)
    crops = []
    for size, indices in groups.items():
        out = torch.empty((len(indices), len(samples), 3, size, size), dtype=torch.uint8)
        for slot, index in enumerate(indices):
            torch.stack([sample["crops"][index] for sample in samples], out=out[slot])
        crops.append(out)
    return {
        "crops": crops,
        "cls": torch.tensor([sample["cls"] for sample in samples], dtype=torch.long),
        "key": [sample["key"] for sample in samples],
    }


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> ``dtype`` normalized with the ImageNet mean/std, on images' device."""
    return TF.normalize(TF.to_dtype(images, dtype, scale=True), IMAGENET_MEAN, IMAGENET_STD)


def center_view(data: bytes, image_size: int = 224, resize_ratio: float = 0.875) -> torch.Tensor:
    """Evaluation view: resize the short side to ``image_size / resize_ratio``, center-crop, normalize.

    Returns float32 (3, image_size, image_size). Standard kNN / linear-probe preprocessing. An image whose
    short side already is ``image_size`` (a 32-px set evaluated at 32) is only center-cropped along its long
    side: resizing it to 37 and cropping 32 would zoom into it, which no evaluation of such sets does.
    """
    short_side = round(image_size / resize_ratio)
    image, _, _ = decode_rgb(data, min_short_side=short_side)
    if min(image.size) != image_size:
        image = TF.resize(image, [short_side], interpolation=TF.InterpolationMode.BICUBIC)
    return normalize(TF.pil_to_tensor(TF.center_crop(image, [image_size, image_size])))
