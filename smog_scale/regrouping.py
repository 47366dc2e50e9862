"""Periodic re-grouping and momentum-encoder resets (docs/method.md "Periodic re-grouping"): when they are
due (pure functions of ``global_step``), and the re-grouping itself (k-means over every rank's cache -> G).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from smog_scale import dist
from smog_scale.config import GroupingConfig
from smog_scale.kmeans import fit as kmeans_fit

if TYPE_CHECKING:
    from smog_scale.engine import TrainState
    from smog_scale.metrics import RunLog


def regroup_due(grouping: GroupingConfig, step: int) -> bool:
    """Whether a re-grouping follows optimizer step ``step``: every ``regroup_every`` steps (0: never)."""
    return grouping.regroup_every > 0 and step % grouping.regroup_every == 0


def reset_due(grouping: GroupingConfig, step: int) -> bool:
    """Whether the momentum encoder is reset after step ``step`` on its own period ``reset_every`` (the resets
    that come with re-groupings, ``reset_every`` null, are :func:`regroup`'s)."""
    every = grouping.reset_every
    return grouping.reset_momentum and every is not None and step % every == 0


def after_step(state: TrainState, log: RunLog) -> None:
    """The periodic events after committed step ``state.global_step``: re-grouping, then a reset on its own period
    (none under the BYOL objective, which has no groups)."""
    grouping, step = state.cfg.grouping, state.global_step
    if state.cfg.model.objective == "byol":
        return
    if regroup_due(grouping, step):
        regroup(state, log)
    if reset_due(grouping, step):
        state.accelerator.unwrap_model(state.model).reset_momentum()
        log.message(f"step {step}: momentum encoder reset to the online encoder")


def regroup(state: TrainState, log: RunLog) -> None:
    """k-means over all ranks' caches -> G, then (``grouping.reset_momentum`` without its own period) reset the
    momentum encoder. Skipped, saying so, while the caches hold fewer rows than K."""
    feats, _ = state.cache.contents()
    available = int(dist.all_reduce_sum(torch.tensor([feats.shape[0]], device=feats.device)).item())
    if available < state.bank.num_groups:
        log.message(f"step {state.global_step}: re-grouping skipped, {available} cached features < K")
        return
    g = state.cfg.grouping
    try:
        result = kmeans_fit(feats, g.num_groups, mode=g.kmeans_mode, iters=g.kmeans_iters,
                            seed=state.cfg.run.seed + state.global_step)
    except ValueError as err:  # raised alike on every rank, e.g. fewer distinct cached rows than K
        log.message(f"step {state.global_step}: re-grouping skipped, groups kept: {err}")
        return
    state.bank.set(result.centroids.to(state.bank.groups.device))
    if g.reset_momentum and g.reset_every is None:
        state.accelerator.unwrap_model(state.model).reset_momentum()
    log.regroup(state, result)
