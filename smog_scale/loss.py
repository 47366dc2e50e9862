"""Group contrast loss (ALGORITHM.md step 4): a pure function of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_contrast_loss(
    preds: torch.Tensor, labels: torch.Tensor, new_groups: torch.Tensor, tau: float = 0.1
) -> torch.Tensor:
    """Mean cross-entropy over all (view, target) pairs.

    preds: [V, B, D] predictor outputs, the G global views first, then the local views.
    labels: [G, B] group labels y of the global views (momentum features against the OLD groups).
    new_groups: [K, D] g' after the synchronous update (normalized here; gradient flows through).

    A global view v is paired with the labels of every other global view; a local view with the
    labels of every global view. Each pair is CE(<p_v, g'> / tau, y_t) averaged over the batch, and
    the loss is the mean over pairs, computed in float32 at least whatever the autocast dtype.
    """
    num_views, batch, _ = preds.shape
    num_global = labels.shape[0]
    if num_global < 2 or num_global > num_views:
        raise ValueError(f"need at least 2 global views among {num_views} views, got {num_global} label rows")
    dtype = torch.promote_types(preds.dtype, torch.float32)
    with torch.autocast(preds.device.type, enabled=False):  # logits over K groups in float32 at least
        logits = F.normalize(preds.to(dtype), dim=-1) @ F.normalize(new_groups.to(dtype), dim=-1).t() / tau
        log_probs = logits.log_softmax(dim=-1)  # [V, B, K]
    target_index = labels.t().unsqueeze(0).expand(num_views, batch, num_global)  # [V, B, G]
    nll = -log_probs.gather(2, target_index)  # [V, B, G]: -log p_v(y_t)
    pairs = torch.ones(num_views, num_global, dtype=nll.dtype, device=nll.device)
    pairs[:num_global].fill_diagonal_(0)  # a global view is not its own target
    return (nll * pairs.unsqueeze(1)).sum() / (pairs.sum() * batch)
