"""Periodic re-grouping and momentum-encoder resets (docs/method.md "Periodic re-grouping"): when they are
due (pure functions of ``global_step``), and the re-grouping itself (k-means over every rank's cache -> G).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from smog_scale import dist
from smog_scale.config import schema as config
from smog_scale.config.schema import Config, Derived, GroupingConfig
from smog_scale.method.grouping import assign
from smog_scale.method.kmeans import fit as kmeans_fit
from smog_scale.training.metrics import RunLog, label_churn

if TYPE_CHECKING:
    from smog_scale.training.step import TrainState


def rows_needed(cfg: Config, derived: Derived) -> int:
    """Cached rows (the union over ranks) a re-grouping needs: ``min_rows_per_group`` x K, or the full caches."""
    grouping = cfg.grouping
    return min(grouping.min_rows_per_group * grouping.num_groups, derived.cache_size_per_device * derived.world_size)


def first_regroup_step(cfg: Config, derived: Derived) -> int:
    """The first optimizer step after which the caches hold :func:`rows_needed` rows: every committed step
    pushes each global view of the global batch (skipped steps push nothing and do not count)."""
    specs = config.crop_specs(cfg)
    global_views = sum(spec.count for spec in specs if spec.size == specs[0].size)
    return math.ceil(rows_needed(cfg, derived) / (global_views * cfg.optim.global_batch_size))


def regroup_due(cfg: Config, derived: Derived, step: int) -> bool:
    """Whether a re-grouping follows optimizer step ``step``: as soon as the caches hold enough rows
    (:func:`first_regroup_step`), and every ``regroup_every`` steps (0: never, nor early)."""
    every = cfg.grouping.regroup_every
    return every > 0 and (step % every == 0 or step == first_regroup_step(cfg, derived))


def schedule(cfg: Config, derived: Derived) -> str:
    """One line for the log: when this run re-groups."""
    every = cfg.grouping.regroup_every
    if cfg.model.objective == "byol" or not every:
        return "re-grouping: never (" + ("model.objective=byol)" if every else "grouping.regroup_every=0)")
    return (f"re-grouping: first after step {first_regroup_step(cfg, derived)} (when the caches hold "
            f"{rows_needed(cfg, derived)} rows), then every {every} steps")


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
    if regroup_due(state.cfg, state.derived, step):
        regroup(state, log)
    if reset_due(grouping, step):
        state.accelerator.unwrap_model(state.model).reset_momentum()
        log.message(f"step {step}: momentum encoder reset to the online encoder")


def regroup(state: TrainState, log: RunLog) -> None:
    """k-means over all ranks' caches -> G, then (``grouping.reset_momentum`` without its own period) reset the
    momentum encoder. Skipped, saying so, while the caches hold fewer rows than :func:`rows_needed`."""
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
