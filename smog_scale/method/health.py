"""Health signals of the grouping (docs/method.md "Grouping health").

Pure functions of group counts, cluster sizes and labels; ``label_churn`` is a collective."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix

from smog_scale import dist


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


def cluster_size_health(sizes: torch.Tensor) -> dict[str, torch.Tensor]:
    """The spread of a re-grouping's cluster sizes [K].

    Largest and smallest (0-dim) and the 0, 10, 50, 90 and 100% quantiles [5], all on the sizes' device."""
    sizes = sizes.float()
    levels = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], device=sizes.device)
    return {"largest": sizes.max(), "smallest": sizes.min(), "quantiles": torch.quantile(sizes, levels)}


def label_churn(old: torch.Tensor, new: torch.Tensor, num_groups: int) -> float:
    """The share of cached rows whose group changed at a re-grouping (docs/method.md "Grouping health").

    ``old`` and ``new`` [N] (long) are this rank's cached rows' groups under the old G and under the new one.
    k-means numbers its centroids arbitrarily, so the old groups are first matched one-to-one to the new ones so
    that as many rows as possible keep their (matched) group: the Hungarian algorithm (scipy's
    ``linear_sum_assignment``) on the [K, K] contingency of the union over all ranks, on rank 0's host. Churn is
    1 - kept / rows. A collective: every rank calls it and gets the same value (one gather, one broadcast).
    """
    pairs = dist.gather_cat(torch.stack([old, new], dim=1))  # [N_union, 2] on rank 0 only
    churn = torch.zeros(1, dtype=torch.float64, device=old.device)
    if pairs is not None and pairs.shape[0]:
        rows = pairs.cpu().numpy()
        counts = coo_matrix((np.ones(len(rows), np.float32), (rows[:, 0], rows[:, 1])), shape=(num_groups, num_groups))
        contingency = counts.toarray()  # duplicates summed; K = 3000: 36 MB, 0.6 s to match on one CPU core
        matched_old, matched_new = linear_sum_assignment(contingency, maximize=True)
        churn.fill_(1.0 - float(contingency[matched_old, matched_new].sum()) / len(rows))
    return float(dist.broadcast(churn).item())


def group_entropy(groups: torch.Tensor, classes: torch.Tensor, num_groups: int, num_classes: int) -> torch.Tensor:
    """Per-group class entropy of the paper's Fig. 5, [num_groups] (nats; 0 for empty groups).

    For each group, sum_c -p_c log p_c over the class ratios of its members."""
    joint = torch.zeros(num_groups, num_classes, dtype=torch.float64, device=groups.device)
    joint.index_put_((groups, classes), torch.ones_like(groups, dtype=torch.float64), accumulate=True)
    ratios = joint / joint.sum(dim=1, keepdim=True).clamp(min=1)
    return -(ratios * ratios.clamp(min=1e-300).log()).sum(dim=1)
