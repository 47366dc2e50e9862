"""Group features G: cosine assignment and the synchronous group update (docs/method.md steps 1-3, 5).

The update is one vectorized ``index_add`` over the batch plus a differentiable all-reduce of the
per-group sums, so G' is the global-batch result on every rank and the loss of any rank reaches the
features of every rank through the (1 - beta) * mean term.
"""

from __future__ import annotations

import typing
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from smog_scale import dist

_SIMILARITY_BLOCK = 2**22  # similarities per block in ``assign`` (16 MB in float32)


def _check_dims(groups: torch.Tensor, feats: torch.Tensor) -> None:
    if groups.ndim != 2 or feats.ndim != 2 or groups.shape[1] != feats.shape[1]:
        raise ValueError(
            f"groups are {tuple(groups.shape)} (K x D) but features are {tuple(feats.shape)} (B x D): "
            f"dimension {groups.shape[-1]} != {feats.shape[-1]}"
        )


def similarities(groups: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Cosine similarities [B, K] of features [B, D] to groups [K, D] (groups assumed unit-norm)."""
    _check_dims(groups, feats)
    return F.normalize(feats, dim=1) @ groups.t()


def assign(groups: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Index [B] (long) of the most cosine-similar group for each feature; never differentiable."""
    return nearest(groups, feats)[1]


def nearest(groups: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner product [B] of each feature with its most cosine-similar unit group, and that group's index [B].

    For unit features the product is the cosine similarity. Never differentiable.
    """
    _check_dims(groups, feats)
    with torch.no_grad():  # argmax_k <z/|z|, g_k> = argmax_k <z, g_k>: the feature norm is irrelevant
        unit_t = F.normalize(groups, dim=1).t().to(feats.dtype)
        # Blocks of rows keep each [rows, K] similarity block in cache: at B=4096, K=3000 one
        # matmul takes 42 ms on one CPU thread, four 1024-row blocks 4 x 4.8 ms.
        rows = max(1, _SIMILARITY_BLOCK // groups.shape[0])
        sims, labels = zip(*(_row_max(block @ unit_t) for block in feats.split(rows)))
        return torch.cat(sims), torch.cat(labels)


def _row_max(sims: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum and its index along each row of ``sims``."""
    if sims.device.type == "cpu" and sims.dtype in (torch.float32, torch.float64):
        # torch's CPU row argmax is ~10x slower than numpy's (5.5 vs 0.4 ms at 1024 x 3000, one thread)
        array = sims.numpy()
        index = array.argmax(axis=1)
        best = np.take_along_axis(array, index[:, None], axis=1)[:, 0]
        return torch.from_numpy(best), torch.from_numpy(index)
    values, labels = sims.max(dim=1)
    return values, labels


Update = Literal["momentum", "adopt_latest", "averaging", "random_select"]
UPDATES: tuple[str, ...] = typing.get_args(Update)


class GroupStatistics(NamedTuple):
    """What the group update of one optimizer step is built from, over the GLOBAL batch (every rank).

    sums: [K, D] per-group sums of the members' features (differentiable: all-reduced with a backward).
    counts: [K] long, members of each group.
    picks: [K, D] for ``random_select`` (else None): one member's feature per group, drawn uniformly among
        the group's members on every rank (zeros for groups without members); differentiable into that
        member only.
    pick_keys: [K] long for ``random_select`` (else None): the random key that won the draw (-1: no member);
        the larger key wins when micro-batches are merged, so the draw stays uniform over the whole step.
    """

    sums: torch.Tensor
    counts: torch.Tensor
    picks: torch.Tensor | None = None
    pick_keys: torch.Tensor | None = None


class GroupUpdate(NamedTuple):
    """G' [K, D] (``new_groups``, not renormalized; gradient flows into the features that built it) with the
    global-batch statistics it was built from."""

    new_groups: torch.Tensor
    stats: GroupStatistics


def group_statistics(
    num_groups: int, feats: torch.Tensor, assignments: torch.Tensor, update: Update = "momentum"
) -> GroupStatistics:
    """Per-group sums [K, D] and member counts [K] of ``feats`` [B, D] assigned by ``assignments`` [B],
    summed over all ranks (docs/method.md step 3): the sums through a differentiable all-reduce, so a
    rank's loss reaches every rank's features, the counts plainly. For ``random_select`` also the picks.

    Both are scatter-adds into fixed [K]-shaped tensors (not ``bincount``, whose output length depends on
    the data), so the shapes are static on every device.
    """
    counts = torch.zeros(num_groups, dtype=torch.long, device=feats.device)
    counts = dist.all_reduce_sum(counts.index_add_(0, assignments, torch.ones_like(assignments)))
    sums = feats.new_zeros(num_groups, feats.shape[1]).index_add(0, assignments, feats)
    stats = GroupStatistics(dist.all_reduce_sum_differentiable(sums), counts)
    return stats._replace(**_random_picks(num_groups, feats, assignments)) if update == "random_select" else stats


def _random_picks(num_groups: int, feats: torch.Tensor, assignments: torch.Tensor) -> dict[str, torch.Tensor]:
    """docs/method.md "Ablations": each group's member drawn uniformly over the global batch, the same on every
    rank. Every row draws a random key (from the device's generator, which the checkpoints keep), made unique
    across ranks by its last digits (key * world + rank); the largest key of each group wins after an
    all-reduce of the maxima, and the winner's rank contributes its feature to an all-reduced sum."""
    world = dist.world_size()
    keys = torch.randint(0, 2**62 // world, assignments.shape, device=feats.device) * world + dist.rank()
    best = torch.full((num_groups,), -1, dtype=torch.long, device=feats.device)
    best = dist.all_reduce_max(best.scatter_reduce(0, assignments, keys, reduce="amax"))
    won = (keys == best[assignments]).unsqueeze(1).to(feats.dtype)  # [B, 1]: one row per group over all ranks
    picks = feats.new_zeros(num_groups, feats.shape[1]).index_add(0, assignments, feats * won)
    return {"picks": dist.all_reduce_sum_differentiable(picks), "pick_keys": best}


def merge_statistics(first: GroupStatistics, second: GroupStatistics) -> GroupStatistics:
    """Statistics of two micro-batches of one step as one (gradient accumulation): sums and counts add, the
    pick with the larger key wins (so it stays a uniform draw over both)."""
    if first.picks is None or second.picks is None or first.pick_keys is None or second.pick_keys is None:
        return GroupStatistics(first.sums + second.sums, first.counts + second.counts)
    newer = second.pick_keys > first.pick_keys
    return GroupStatistics(first.sums + second.sums, first.counts + second.counts,
                           torch.where(newer.unsqueeze(1), second.picks, first.picks),
                           torch.maximum(first.pick_keys, second.pick_keys))


def updated_groups(
    groups: torch.Tensor, stats: GroupStatistics, beta: float | torch.Tensor, update: Update = "momentum",
    updates: torch.Tensor | None = None,
) -> torch.Tensor:
    """g' [K, D] from the statistics, in the dtype of ``stats.sums``, for the group-update rule ``update``
    (docs/method.md step 3 and "Ablations"); groups without members keep g_k exactly:

    - ``momentum``: g'_k = beta g_k + (1 - beta) mean_k; the gradient reaches each member z_i with weight
      (1 - beta) / n_k.
    - ``adopt_latest``: g'_k = mean_k (weight 1 / n_k).
    - ``averaging``: g'_k = g_k + (mean_k - g_k) / u_k, u_k = ``updates``_k + 1 the number of updates g_k has
      received since the last re-grouping, this one included (``updates`` [K] long counts the earlier ones);
      the first update after a re-grouping adopts the mean, later ones average the step means (weight
      1 / (u_k n_k)).
    - ``random_select``: g'_k = the picked member's feature (the whole gradient reaches that member).

    The one place the group update lives: the loss's partial update and the commit of an optimizer step
    (``smog_scale.method.accumulation``) both call it.
    """
    groups = groups.to(stats.sums.dtype)
    members = (stats.counts > 0).unsqueeze(1)
    if update == "random_select":
        if stats.picks is None:
            raise ValueError("random_select needs the statistics' picks (group_statistics(..., 'random_select'))")
        return torch.where(members, stats.picks.to(groups.dtype), groups)
    mean = stats.sums / stats.counts.clamp(min=1).unsqueeze(1).to(stats.sums.dtype)
    if update == "adopt_latest":
        return torch.where(members, mean, groups)
    if update == "averaging":
        if updates is None:
            raise ValueError("the averaging update needs the groups' update counts")
        keep = (updates.to(groups.dtype) / (updates.to(groups.dtype) + 1)).unsqueeze(1)  # 1 - 1 / u_k
        return torch.where(members, keep * groups + (1 - keep) * mean, groups)
    return torch.where(members, beta * groups + (1 - beta) * mean, groups)


def group_update(
    groups: torch.Tensor, feats: torch.Tensor, assignments: torch.Tensor, beta: float | torch.Tensor,
    update: Update = "momentum", updates: torch.Tensor | None = None,
) -> GroupUpdate:
    """docs/method.md step 3 given the assignments c [B] of ``feats`` [B, D] to ``groups`` [K, D]: the
    statistics over the GLOBAL batch (all ranks) and g' by ``update`` (:func:`updated_groups`)."""
    _check_dims(groups, feats)
    stats = group_statistics(groups.shape[0], feats, assignments, update)
    return GroupUpdate(updated_groups(groups, stats, beta, update, updates), stats)


def momentum_update(groups: torch.Tensor, feats: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """G' [K, D] after the synchronous momentum update of ``groups`` [K, D] with ``feats`` [B, D].

    Assigns each feature to its most cosine-similar group (step 2) and applies step 3; with a process
    group initialized the update covers every rank's features.
    """
    return group_update(groups, feats, assign(groups, feats), beta).new_groups


class GroupBank(torch.nn.Module):
    """G as checkpointed state (buffers, not parameters), identical on every rank: the groups [K, D] and
    ``updates`` [K] (long), the updates each group received since the last re-grouping (the averaging rule's
    n; kept for every rule).

    ``commit`` writes G <- normalize(g') only when the step was finite, without a host sync: the
    finiteness flag stays on the device and selects between the old and new G.
    """

    groups: torch.Tensor  # the buffers registered below, declared for the type checker
    updates: torch.Tensor

    def __init__(self, num_groups: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("groups", F.normalize(torch.randn(num_groups, dim), dim=1))
        self.register_buffer("updates", torch.zeros(num_groups, dtype=torch.long))

    @property
    def num_groups(self) -> int:
        return self.groups.shape[0]

    @torch.no_grad()
    def commit(self, new_groups: torch.Tensor, ok: torch.Tensor | None = None,
               counts: torch.Tensor | None = None) -> None:
        """docs/method.md step 5: G <- stop_grad(normalize(g')) where ``ok`` (0-dim bool; default true) is true;
        groups with members (``counts`` [K] > 0, default: all) count one more update."""
        candidate = F.normalize(new_groups.detach().float(), dim=1)
        ok = torch.ones((), dtype=torch.bool, device=self.groups.device) if ok is None else ok
        self.groups.copy_(torch.where(ok, candidate, self.groups))
        updated = torch.ones_like(self.updates) if counts is None else (counts > 0).long()
        self.updates.add_(updated * ok.long())

    @torch.no_grad()
    def set(self, centroids: torch.Tensor) -> None:
        """Replace G after re-grouping (centroids [K, D], identical on every rank); no group has been updated since."""
        if centroids.shape != self.groups.shape:
            raise ValueError(f"centroids are {tuple(centroids.shape)}, groups are {tuple(self.groups.shape)}")
        self.groups.copy_(F.normalize(centroids.float(), dim=1))
        self.updates.zero_()
