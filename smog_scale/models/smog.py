"""SMoGModel: online (backbone, projector, predictor) and momentum (backbone, projector) encoders."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from smog_scale.models import ema
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

    The momentum encoder makes the labels (docs/method.md "Networks"), so it is deterministic and
    float32: in train mode only its BatchNorm layers train (batch statistics); dropout and stochastic
    depth stay off (:meth:`train`). Its weights are kept float32 whatever the training precision
    (:meth:`settle_dtypes` after DeepSpeed cast the module), while it computes in the online
    encoder's precision.
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
        self.train()

    def train(self, mode: bool = True) -> SMoGModel:
        """``nn.Module.train``, except that in the momentum encoder only BatchNorm layers follow ``mode``:
        everything else (dropout, timm's DropPath) stays in eval mode, so labels come from a
        deterministic encoder (BatchNorm batch statistics aside)."""
        super().train(mode)
        for module in self.momentum.modules():
            module.training = mode and isinstance(module, nn.modules.batchnorm._NormBase)
        return self

    def settle_dtypes(self) -> None:
        """After Accelerate/DeepSpeed prepared the model: the momentum encoder back to float32, the online
        networks' float buffers (BatchNorm statistics) in their weights' dtype.

        DeepSpeed casts every parameter it is given to bf16/fp16 and leaves the buffers float32. A bf16
        momentum encoder stalls (an EMA by 1 - m = 0.001 rounds to no change); its parameters never reach
        the optimizer, so nothing else holds them. BatchNorm with bf16 weights needs bf16 statistics (CPU and
        CUDA kernels reject the mix). Without DeepSpeed everything is float32 already and nothing changes.
        """
        self.momentum.float()
        for network in (self.online, self.predictor):
            dtype = _dtype(network)
            for buffer in network.buffers():
                if buffer.is_floating_point():
                    buffer.data = buffer.data.to(dtype)

    def _online(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        views, batch = images.shape[:2]
        z = self.online(images.flatten(0, 1).to(_dtype(self.online)))
        return z.unflatten(0, (views, batch)), self.predictor(z).unflatten(0, (views, batch))

    def forward(self, crops: Sequence[torch.Tensor]) -> SMoGOutput:
        """crops: per resolution [views, B, 3, S, S] -> z, p [V, B, D] (online dtype), e [G, B, D]."""
        outs = [self._online(images) for images in crops]
        z = torch.cat([o[0] for o in outs])
        p = torch.cat([o[1] for o in outs])
        global_views = crops[0]
        online, momentum = _dtype(self.online), _dtype(self.momentum)
        # Under DeepSpeed (no autocast, online weights in bf16/fp16) the float32 momentum encoder computes
        # in the online precision, as it does under Accelerate's autocast (which this leaves in force).
        lower = online != momentum and online in (torch.bfloat16, torch.float16)
        precision = torch.autocast(global_views.device.type, dtype=online) if lower else contextlib.nullcontext()
        with torch.no_grad(), precision:
            e = self.momentum(global_views.flatten(0, 1).to(momentum)).unflatten(0, global_views.shape[:2])
        return SMoGOutput(z, p, e)

    def update_momentum(self, m: float) -> None:
        """EMA step of the momentum encoder (after the optimizer step)."""
        ema.update(self.online, self.momentum, m)

    def reset_momentum(self) -> None:
        """Copy the online encoder into the momentum encoder (after each re-grouping)."""
        ema.reset(self.online, self.momentum)


def _dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first parameter (every parameter of an encoder shares it)."""
    return next(module.parameters()).dtype
