"""Parameter groups and the optimizer factory (LARS from timm, SGD, AdamW)."""

from __future__ import annotations

from typing import cast

import torch
from timm.optim import Lars, param_groups_weight_decay
from torch import nn

from smog_scale.config.schema import OptimConfig


def no_weight_decay_patterns(model: nn.Module) -> set[str]:
    """The parameters that ``model``'s own submodules exempt from weight decay, as full-name patterns.

    timm models list them in ``no_weight_decay()`` (Swin: ``relative_position_bias_table``; ViT:
    ``pos_embed``, ``cls_token``), MoBY's Swin also in ``no_weight_decay_keywords()``; both are named
    relative to that submodule, so they are prefixed here with its path (``online.backbone.``).
    """
    patterns = set()
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if callable(getattr(module, "no_weight_decay", None)):
            patterns |= {prefix + name for name in module.no_weight_decay()}
        if callable(getattr(module, "no_weight_decay_keywords", None)):
            patterns |= {f"{prefix}*{keyword}*" for keyword in module.no_weight_decay_keywords()}
    return patterns


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights with decay, then biases, norm parameters (ndim <= 1) and the model's own
    ``no_weight_decay`` parameters without, through timm's ``param_groups_weight_decay``.

    With timm's LARS a group whose weight decay is 0 also skips the trust ratio, so biases and norm
    parameters get neither, as in BYOL. Frozen parameters (the momentum encoder) are left out. The
    decay group comes first, as in checkpoints written before the model's own list was used.
    """
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_weight_decay_patterns(model))
    return sorted(groups, key=lambda group: group["weight_decay"] == 0)


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
