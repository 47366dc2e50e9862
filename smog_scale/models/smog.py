"""SMoGModel: online (backbone, projector, predictor) and momentum (backbone, projector) encoders."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from smog_scale import momentum
from smog_scale.models.backbone import build_backbone
from smog_scale.models.heads import predictor, projector


class Encoder(nn.Module):
    """Backbone followed by projector; state-dict keys ``backbone.*`` stay timm's own."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(images))


class SMoGOutput(NamedTuple):
    """z, p: [V, B, D] online projector / predictor outputs of every view (global views first).
    e: [G, B, D] momentum projector outputs of the global views (no gradient).
    Not normalized: the grouping and the loss normalize."""

    z: torch.Tensor
    p: torch.Tensor
    e: torch.Tensor


class SMoGModel(nn.Module):
    """The SMoG networks. ``forward`` runs both encoders so a DDP wrapper sees one call per step.

    Views of equal resolution share one backbone call (DINO's MultiCropWrapper): ``forward`` takes a
    list of tensors, one per resolution, each [views, B, 3, S, S], the global resolution first.
    """

    def __init__(
        self,
        backbone: str,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 128,
        pred_hidden_dim: int = 2048,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        trunk = build_backbone(backbone, **(backbone_kwargs or {}))
        self.online = Encoder(trunk, projector(cast(int, trunk.num_features), proj_hidden_dim, proj_dim))
        self.predictor = predictor(proj_dim, pred_hidden_dim)
        self.momentum = copy.deepcopy(self.online).requires_grad_(False)

    def _online(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        views, batch = images.shape[:2]
        z = self.online(images.flatten(0, 1))
        return z.unflatten(0, (views, batch)), self.predictor(z).unflatten(0, (views, batch))

    def forward(self, crops: Sequence[torch.Tensor]) -> SMoGOutput:
        outs = [self._online(images) for images in crops]
        z = torch.cat([o[0] for o in outs])
        p = torch.cat([o[1] for o in outs])
        global_views = crops[0]
        with torch.no_grad():
            e = self.momentum(global_views.flatten(0, 1)).unflatten(0, global_views.shape[:2])
        return SMoGOutput(z, p, e)

    def update_momentum(self, m: float) -> None:
        """EMA step of the momentum encoder (after the optimizer step)."""
        momentum.ema_update(self.online, self.momentum, m)

    def reset_momentum(self) -> None:
        """Copy the online encoder into the momentum encoder (after each re-grouping)."""
        momentum.reset(self.online, self.momentum)
