"""The losses over (view, target) pairs, pure functions of tensors: SMoG's group contrast, BYOL's and NT-Xent.

SMoG's group contrast (docs/method.md step 4) and BYOL's normalized-prediction loss (the instance-level
control, docs/method.md "The BYOL control"). Both pair every view with the targets of the global views: a
global view with every OTHER global view's target, a local view with every global view's target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smog_scale import dist


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
    pairs = pair_weights(num_views, labels.shape[0], preds.device)
    dtype = torch.promote_types(preds.dtype, torch.float32)
    with torch.autocast(preds.device.type, enabled=False):  # logits over K groups in float32 at least
        logits = F.normalize(preds.to(dtype), dim=-1) @ F.normalize(new_groups.to(dtype), dim=-1).t() / tau
        log_probs = logits.log_softmax(dim=-1)  # [V, B, K]
    target_index = labels.t().unsqueeze(0).expand(num_views, batch, labels.shape[0])  # [V, B, G]
    nll = -log_probs.gather(2, target_index)  # [V, B, G]: -log p_v(y_t)
    return (nll * pairs.unsqueeze(1)).sum() / (pairs.sum() * batch)


def byol_loss(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BYOL's loss (Grill et al. 2020): ||p_v/|p_v| - e_t/|e_t|||^2 = 2 - 2 cos(p_v, e_t), averaged over the batch,
    over the same (view, target) pairs as :func:`group_contrast_loss`.

    preds: [V, B, D] predictor outputs, the G global views first, then the local views.
    targets: [G, B, D] momentum projector outputs of the global views (no gradient flows into them).

    Returns 2 x the mean over pairs: with two views that is BYOL's symmetrized loss L(a, b) + L(b, a), so its
    published hyperparameters apply; with local views the scale stays that of two views (the pairs are
    averaged, as the group contrast loss does). Computed in float32 at least.
    """
    num_views, batch, _ = preds.shape
    pairs = pair_weights(num_views, targets.shape[0], preds.device)
    dtype = torch.promote_types(preds.dtype, torch.float32)
    with torch.autocast(preds.device.type, enabled=False):
        p = F.normalize(preds.to(dtype), dim=-1)
        e = F.normalize(targets.detach().to(dtype), dim=-1)
        cos = torch.einsum("vbd,gbd->vg", p, e) / batch  # [V, G]: mean cosine of each pair over the batch
    return 2 * ((2 - 2 * cos) * pairs).sum() / pairs.sum()


def nt_xent(z: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    """SimCLR's NT-Xent over the GLOBAL batch (Chen et al. 2020): each of the 2 views of an image is classified
    against the other view among every other view of every rank's batch, in float32 at least.

    z: [2, B, D] this rank's projector outputs of the 2 global views (normalized here). Every rank's rows are
    gathered with a differentiable all-gather, so with W ranks the loss is the mean over this rank's 2B anchors
    of the one-process loss on the concatenated W*B batch, and DDP's average of the ranks' gradients is that
    loss's gradient.
    """
    views, batch, _ = z.shape
    if views != 2:
        raise ValueError(f"NT-Xent takes exactly 2 views, got {views}")
    dtype = torch.promote_types(z.dtype, torch.float32)
    with torch.autocast(z.device.type, enabled=False):
        local = F.normalize(z.to(dtype), dim=-1)  # [2, B, D]
        every = dist.all_gather_differentiable(local.transpose(0, 1).contiguous())  # [W*B, 2, D]
        candidates = every.transpose(0, 1).flatten(0, 1)  # [2*W*B, D]: view a of every image, then view b
        logits = local.flatten(0, 1) @ candidates.t() / tau  # [2B, 2WB]
    total, offset = every.shape[0], dist.rank() * batch
    view = torch.arange(2, device=z.device).repeat_interleave(batch)  # each anchor's view
    image = torch.arange(batch, device=z.device).repeat(2) + offset  # each anchor's image, global index
    own = view * total + image  # the anchor itself: not a candidate
    logits = logits.scatter(1, own.unsqueeze(1), float("-inf"))
    return F.cross_entropy(logits, (1 - view) * total + image)  # the other view of the same image


def pair_weights(num_views: int, num_global: int, device: torch.device) -> torch.Tensor:
    """[V, G] float32: 1 where view v is trained against the target of global view t, 0 where v is t itself."""
    if num_global < 2 or num_global > num_views:
        raise ValueError(f"need at least 2 global views among {num_views} views, got {num_global} target rows")
    pairs = torch.ones(num_views, num_global, device=device)
    pairs[:num_global].fill_diagonal_(0)  # a global view is not its own target
    return pairs
