"""Periodic re-grouping and momentum-encoder resets (docs/method.md "Periodic re-grouping").

The re-grouping itself (k-means over every rank's cache -> G) and the reset, when
:mod:`smog_scale.method.regroup_schedule` says they are due.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from smog_scale import dist
from smog_scale.method.grouping import assign
from smog_scale.method.health import label_churn
from smog_scale.method.kmeans import fit as kmeans_fit
from smog_scale.method.regroup_schedule import regroup_due, reset_due, rows_needed
from smog_scale.training.run_log import RunLog

if TYPE_CHECKING:
    from smog_scale.training.step import TrainState


def after_step(state: TrainState, log: RunLog) -> None:
    """The periodic events after committed step ``state.global_step``: re-grouping, then a reset.

    The reset on its own period; none of them under the BYOL objective, which has no groups."""
    grouping, step = state.cfg.grouping, state.global_step
    if state.cfg.model.objective == "byol":
        return
    if regroup_due(state.cfg, state.derived, step):
        regroup(state, log)
    if reset_due(grouping, step):
        state.accelerator.unwrap_model(state.model).reset_momentum()
        log.message(f"step {step}: momentum encoder reset to the online encoder")


def regroup(state: TrainState, log: RunLog) -> None:
    """k-means over all ranks' caches -> G, then a reset of the momentum encoder.

    The reset when ``grouping.reset_momentum`` has no period of its own. Skipped, saying so, while the caches
    hold fewer rows than :func:`rows_needed`."""
    feats, _ = state.cache.contents()
    available = int(dist.all_reduce_sum(torch.tensor([feats.shape[0]], device=feats.device)).item())
    needed = rows_needed(state.cfg, state.derived)
    if available < needed:
        log.message(f"step {state.global_step}: re-grouping skipped, {available} cached features < {needed} "
                    f"(grouping.min_rows_per_group x K, or the full caches)")
        return
    g = state.cfg.grouping
    try:
        result = kmeans_fit(feats, g.num_groups, mode=g.kmeans_mode, iters=g.kmeans_iters,
                            seed=state.cfg.run.seed + state.global_step)
    except ValueError as err:  # raised alike on every rank, e.g. fewer distinct cached rows than K
        log.message(f"step {state.global_step}: re-grouping skipped, groups kept: {err}")
        return
    centroids = result.centroids.to(state.bank.groups.device)
    churn = label_churn(assign(state.bank.groups, feats), assign(centroids, feats), g.num_groups)
    state.bank.set(centroids)
    if g.reset_momentum and g.reset_every is None:
        state.accelerator.unwrap_model(state.model).reset_momentum()
    log.regroup(state, result, churn)
