"""What one micro-batch computes from the networks' outputs, by the recipe's ``model.objective``.

SMoG's grouping and group contrast loss (docs/method.md "One training step"), its optional instance
warm-up (docs/method.md "Instance warm-up"), or BYOL's loss for the instance-level control (docs/method.md
"The BYOL control"). Functions of tensors shared by the trainer, the tests and the benchmarks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from smog_scale.config.schema import Config
from smog_scale.method.grouping import GroupBank, GroupStatistics, Update, assign, group_statistics, group_update
from smog_scale.method.loss import byol_loss, group_contrast_loss, nt_xent, pair_weights
from smog_scale.models.smog import SMoGOutput


class GroupingStep(NamedTuple):
    """loss: scalar; new_groups: [K, D] g'; stats: the global-batch statistics g' was built from;
    cache_feats: [G*B, D] normalized features of the global views for the cache; health: [2] float32 on this
    rank, the label agreement and the prediction hit rate (:func:`grouping_health`); ok: 0-dim bool, everything
    finite."""

    loss: torch.Tensor
    new_groups: torch.Tensor
    stats: GroupStatistics
    cache_feats: torch.Tensor
    health: torch.Tensor
    ok: torch.Tensor


def grouping_step(
    out: SMoGOutput, groups: torch.Tensor, beta: float, tau: float, cache_online: bool = False,
    update: Update = "momentum", updates: torch.Tensor | None = None,
) -> GroupingStep:
    """docs/method.md steps 1-4 on one rank's model outputs; the update covers all ranks. ``update`` is the
    group-update rule and ``updates`` [K] the groups' update counts (the averaging rule's; ``GroupBank.updates``).

    With gradient accumulation this runs once per micro-batch against the same G (the step's G is
    committed only at its end, from every micro-batch's ``stats``: ``smog_scale.method.accumulation``).
    The loss here uses this micro-batch's own partial update g'_j = beta * g + (1 - beta) * mean_j, where one
    process on the whole global batch would use the mean over all micro-batches: g'_j - g' = (1 - beta) *
    (mean_j - mean), so the loss and its gradient differ by a term of order 1 - beta (zero at beta = 1, where
    g' = g). Labels, assignments and the committed G are unaffected.
    """
    num_global, batch = out.e.shape[:2]
    dtype = torch.promote_types(out.z.dtype, torch.float32)
    with torch.autocast(out.z.device.type, enabled=False):  # grouping in float32 at least
        e = F.normalize(out.e.to(dtype), dim=-1)
        z_global = F.normalize(out.z[:num_global].to(dtype), dim=-1).flatten(0, 1)
        labels = assign(groups, e.flatten(0, 1)).view(num_global, batch)  # step 1
        new = group_update(groups, z_global, assign(groups, z_global), beta, update, updates)  # steps 2-3
    loss = group_contrast_loss(out.p, labels, new.new_groups, tau)  # step 4
    cache_feats = z_global.detach() if cache_online else e.flatten(0, 1)  # step 6 (choice)
    ok = torch.isfinite(loss) & torch.isfinite(new.new_groups).all() & torch.isfinite(cache_feats).all()
    health = grouping_health(out.p, labels, new.new_groups)
    return GroupingStep(loss, new.new_groups, new.stats, cache_feats, health, ok)


def grouping_health(preds: torch.Tensor, labels: torch.Tensor, new_groups: torch.Tensor) -> torch.Tensor:
    """[2] float32 on the device, no host sync (docs/method.md "Grouping health"):

    - label agreement: the share of (sample, pair of distinct global views a, b) with y_a = y_b;
    - prediction hit rate: the share of the loss's (view v, target t) pairs whose prediction's nearest group
      in G' is the target's label, argmax_k <p_v, g'_k> = y_t: the accuracy of the classification the loss trains.

    preds: [V, B, D] predictor outputs; labels: [G, B]; new_groups: [K, D] g'.
    """
    num_global = labels.shape[0]
    with torch.no_grad():
        pairs = pair_weights(preds.shape[0], num_global, preds.device)  # [V, G]
        same = (labels.unsqueeze(1) == labels.unsqueeze(0)).float().mean(dim=2)  # [G, G], mean over the batch
        agreement = (same * pairs[:num_global]).sum() / pairs[:num_global].sum()
        predicted = assign(new_groups.detach().float(), preds.detach().flatten(0, 1).float()).view(preds.shape[:2])
        hits = (predicted.unsqueeze(1) == labels.unsqueeze(0)).float().mean(dim=2)  # [V, G]
        return torch.stack([agreement, (hits * pairs).sum() / pairs.sum()])


class ByolStep(NamedTuple):
    """loss: scalar; ok: 0-dim bool, the loss finite. No groups, statistics or cache rows."""

    loss: torch.Tensor
    ok: torch.Tensor


def byol_step(out: SMoGOutput) -> ByolStep:
    """BYOL's loss on one rank's outputs: every view's prediction against the momentum encoder's projection of
    the global views (docs/method.md "The BYOL control")."""
    loss = byol_loss(out.p, out.e)
    return ByolStep(loss, torch.isfinite(loss))


def instance_warmup_step(out: SMoGOutput, groups: torch.Tensor, tau: float, cache_online: bool = False,
                         update: Update = "momentum") -> GroupingStep:
    """The instance warm-up's micro-batch (docs/method.md "Instance warm-up"): NT-Xent over the global batch of
    the online projector outputs of the 2 global views, every image its own group. G gets no update (the
    statistics have no member in any group, so the commit keeps it); the cache fills as in SMoG's step 6, and
    the health signals are those of G's labels, so the log shows the agreement the first re-grouping starts from.
    """
    num_global, batch = out.e.shape[:2]
    dtype = torch.promote_types(out.z.dtype, torch.float32)
    # The predictor gets a zero gradient, not none: DDP fails a step in which a parameter had no gradient.
    loss = nt_xent(out.z[:num_global], tau) + 0.0 * out.p.float().sum()
    with torch.autocast(out.z.device.type, enabled=False):
        e = F.normalize(out.e.to(dtype), dim=-1)
        z_global = F.normalize(out.z[:num_global].detach().to(dtype), dim=-1).flatten(0, 1)
        labels = assign(groups, e.flatten(0, 1)).view(num_global, batch)
        none = group_statistics(groups.shape[0], z_global[:0], labels.flatten()[:0], update)  # no member: G stays
    cache_feats = z_global if cache_online else e.flatten(0, 1)
    ok = torch.isfinite(loss) & torch.isfinite(cache_feats).all()
    return GroupingStep(loss, groups.to(dtype), none, cache_feats, grouping_health(out.p, labels, groups), ok)


def objective_step(out: SMoGOutput, cfg: Config, bank: GroupBank, beta: float, step: int) -> GroupingStep | ByolStep:
    """The recipe's objective on one micro-batch's outputs at optimizer step ``step`` (``bank``: G and its update
    counts, for SMoG; before ``grouping.instance_warmup_steps`` the instance warm-up's)."""
    if cfg.model.objective == "byol":
        return byol_step(out)
    g = cfg.grouping
    if step < g.instance_warmup_steps:
        return instance_warmup_step(out, bank.groups, g.instance_tau, g.cache_features == "online", g.update)
    return grouping_step(out, bank.groups, beta, g.tau, g.cache_features == "online", g.update, bank.updates)
