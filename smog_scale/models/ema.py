"""Momentum encoder maintenance: EMA of the online weights and the full reset at re-grouping.

An explicit loop step under ``no_grad``, never inside ``forward`` (docs/method.md "Networks"); the EMA is
one foreach lerp over all parameters as in timm's ``ModelEmaV3``.
"""

from __future__ import annotations

import torch
from torch import nn


def _float_and_other_buffers(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    buffers = list(module.buffers())
    return [b for b in buffers if b.is_floating_point()], [b for b in buffers if not b.is_floating_point()]


def _check_pair(online: nn.Module, momentum: nn.Module) -> None:
    o, m = [p.shape for p in online.parameters()], [p.shape for p in momentum.parameters()]
    if o != m:
        raise ValueError(f"online and momentum encoders differ: {len(o)} vs {len(m)} parameters")


def _like(sources: list[torch.Tensor], targets: list[torch.Tensor]) -> list[torch.Tensor]:
    """``sources`` in the dtypes of ``targets`` (the same tensors where they already match)."""
    return [s.to(t.dtype) for s, t in zip(sources, targets)]


@torch.no_grad()
def update(online: nn.Module, momentum: nn.Module, m: float) -> None:
    """momentum <- m * momentum + (1 - m) * online, parameters and float buffers (BN statistics).

    The lerp runs in the momentum encoder's dtype (float32): bf16/fp16 online weights (DeepSpeed) are
    upcast first, since a bf16 lerp by 1 - m = 0.001 mostly rounds to no change.
    """
    momentum_params: list[torch.Tensor] = list(momentum.parameters())
    online_params: list[torch.Tensor] = list(online.parameters())
    torch._foreach_lerp_(momentum_params, _like(online_params, momentum_params), 1.0 - m)
    online_float, online_other = _float_and_other_buffers(online)
    momentum_float, momentum_other = _float_and_other_buffers(momentum)
    if online_float:
        torch._foreach_lerp_(momentum_float, _like(online_float, momentum_float), 1.0 - m)
    for target, source in zip(momentum_other, online_other):
        target.copy_(source)


@torch.no_grad()
def reset(online: nn.Module, momentum: nn.Module) -> None:
    """momentum <- online, every parameter and buffer (docs/method.md "Periodic re-grouping" 3)."""
    _check_pair(online, momentum)
    for target, source in zip(momentum.parameters(), online.parameters()):
        target.copy_(source)
    for target_buffer, source_buffer in zip(momentum.buffers(), online.buffers()):
        target_buffer.copy_(source_buffer)
