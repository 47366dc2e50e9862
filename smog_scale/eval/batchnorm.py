"""BatchNorm statistics re-estimated on data, the weights untouched.

The baseline that separates what training learned from the statistics alone."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, images: Iterable[torch.Tensor]) -> int:
    """Replace the running statistics of every BatchNorm layer of ``model`` by their plain average over the
    batches of ``images`` (normalized [B, 3, S, S], on the model's device); no weight changes. Returns the
    number of batches. The model is left in eval mode.

    A backbone's eval-mode features depend on these statistics as much as on its weights: a timm backbone at
    random init has running mean 0 and variance 1 (its BatchNorm an affine no-op in eval mode), while any
    trained backbone carries statistics of the data. Re-estimating them on random weights gives the baseline
    that separates what training learned from what the statistics alone change (benchmarks/README.md,
    "Learning on small data").
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    model.eval()  # dropout and drop path off: only the statistics may differ from the evaluated network
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches
        layer.train()
    count = 0
    for batch in images:
        model(batch)
        count += 1
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    model.eval()
    if count == 0:
        raise ValueError("BatchNorm re-estimation read no batch")
    return count
