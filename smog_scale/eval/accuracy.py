"""Top-k accuracy counts, shared by kNN, the linear probe and fine-tuning (accuracies are percentages)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

TOPK = (1, 5)



def topk_correct(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = TOPK) -> list[int]:
    """For each k, the rows whose target is among their k best scores (k capped at the number of classes)."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == targets[:, None]
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]
