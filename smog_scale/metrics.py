"""Health signals of the grouping (ALGORITHM.md "Health signals") as device tensors, read on log steps."""

from __future__ import annotations

import torch


def assignment_health(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """From global per-group member counts [K]: groups used, assignment entropy (nats), largest share."""
    total = counts.sum().clamp(min=1).to(torch.float32)
    probs = counts.to(torch.float32) / total
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum()
    return {
        "groups_used": (counts > 0).sum(),
        "assignment_entropy": entropy,
        "largest_group_share": probs.max(),
    }


def group_entropy(groups: torch.Tensor, classes: torch.Tensor, num_groups: int, num_classes: int) -> torch.Tensor:
    """Per-group class entropy of the paper's Fig. 5: for each group, sum_c -p_c log p_c over the class
    ratios of its members. Returns [num_groups] (nats; 0 for empty groups)."""
    joint = torch.zeros(num_groups, num_classes, dtype=torch.float64, device=groups.device)
    joint.index_put_((groups, classes), torch.ones_like(groups, dtype=torch.float64), accumulate=True)
    ratios = joint / joint.sum(dim=1, keepdim=True).clamp(min=1)
    return -(ratios * ratios.clamp(min=1e-300).log()).sum(dim=1)
