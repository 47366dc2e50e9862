"""Parameter groups and the optimizer factory (LARS from timm, SGD, AdamW)."""

from __future__ import annotations

from typing import cast

import torch
from timm.optim import Lars
from torch import nn

from smog_scale.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay, and biases / norm parameters (ndim <= 1) without.

    With timm's LARS a group whose weight decay is 0 also skips the trust ratio, so biases and norm
    parameters get neither, as in BYOL. Frozen parameters (the momentum encoder) are left out.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The configured optimizer over ``param_groups``; ``lr`` is the peak (scaled) learning rate."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "lars":
        return Lars(groups, lr=lr, momentum=cfg.momentum, trust_coeff=cfg.trust_coeff)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=cast(tuple[float, float], tuple(cfg.betas)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
