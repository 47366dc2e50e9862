"""The one backbone builder: ``timm.create_model(num_classes=0)``, keys kept timm-loadable.

Importing this module registers the SimCLR-style wide ResNets ``resnet50x2`` and ``resnet50x4`` as
timm model names (every layer's width multiplied, stem included: about 94M and 375M parameters),
built with timm's own ResNet class so exported weights load with ``timm.create_model``.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, _cfg, _create_resnet

# timm's register_model reads the module's ``default_cfgs`` for input size, mean/std and layer names.
default_cfgs = generate_default_cfgs(
    {name: _cfg(first_conv="conv1", classifier="fc", pool_size=(7, 7)) for name in ("resnet50x2", "resnet50x4")}
)


def _wide_resnet50(variant: str, width: int, pretrained: bool, **kwargs: Any) -> torch.nn.Module:
    args = dict(
        block=Bottleneck,
        layers=(3, 4, 6, 3),
        stem_width=64 * width,
        channels=tuple(c * width for c in (64, 128, 256, 512)),
    )
    return _create_resnet(variant, pretrained, **dict(args, **kwargs))


# timm's registry wants one decorated function per name; these are its two entries.
@register_model
def resnet50x2(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    """ResNet-50 with every layer twice as wide (SimCLR R50x2)."""
    return _wide_resnet50("resnet50x2", 2, pretrained, **kwargs)


@register_model
def resnet50x4(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    """ResNet-50 with every layer four times as wide (SimCLR R50x4)."""
    return _wide_resnet50("resnet50x4", 4, pretrained, **kwargs)


def build_backbone(name: str, **kwargs: Any) -> torch.nn.Module:
    """A timm model without classifier: ``forward`` returns pooled features [B, num_features]."""
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as err:  # timm raises RuntimeError('Unknown model ...')
        raise ValueError(f"unknown backbone {name!r}: {err}") from err
