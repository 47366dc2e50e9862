"""One SMoG step's math, shared by the trainer and the tests: grouping, loss and finiteness.

Data flow (ALGORITHM.md "One training step"): labels from the momentum features with the OLD
groups, assignment of the online global views with the OLD groups, synchronous update to G', group
contrast loss against G'. The caller backpropagates, steps, then commits G' and pushes the cache
only where ``ok``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from smog_scale.grouping import assign, momentum_update_from_assignments
from smog_scale.loss import group_contrast_loss
from smog_scale.models.smog import SMoGOutput


class GroupingStep(NamedTuple):
    """loss: scalar; new_groups: [K, D] g'; counts: [K] global members; cache_feats: [G*B, D]
    normalized momentum features of the global views; ok: 0-dim bool, everything finite."""

    loss: torch.Tensor
    new_groups: torch.Tensor
    counts: torch.Tensor
    cache_feats: torch.Tensor
    ok: torch.Tensor


def grouping_step(
    out: SMoGOutput, groups: torch.Tensor, beta: float, tau: float, cache_online: bool = False
) -> GroupingStep:
    """ALGORITHM.md steps 1-4 on one rank's model outputs; the update covers all ranks."""
    num_global, batch = out.e.shape[:2]
    dtype = torch.promote_types(out.z.dtype, torch.float32)
    with torch.autocast(out.z.device.type, enabled=False):  # grouping in float32 at least
        e = F.normalize(out.e.to(dtype), dim=-1)
        z_global = F.normalize(out.z[:num_global].to(dtype), dim=-1).flatten(0, 1)
        labels = assign(groups, e.flatten(0, 1)).view(num_global, batch)  # step 1
        update = momentum_update_from_assignments(groups, z_global, assign(groups, z_global), beta)  # 2-3
    loss = group_contrast_loss(out.p, labels, update.new_groups, tau)  # step 4
    cache_feats = z_global.detach() if cache_online else e.flatten(0, 1)  # step 6 (choice)
    ok = torch.isfinite(loss) & torch.isfinite(update.new_groups).all() & torch.isfinite(cache_feats).all()
    return GroupingStep(loss, update.new_groups, update.counts, cache_feats, ok)
