"""When re-groupings and momentum-encoder resets are due (docs/method.md "Periodic re-grouping").

Pure functions of the recipe, the launch's derived values and ``global_step``; the re-grouping itself is
:mod:`smog_scale.training.regrouping`."""

from __future__ import annotations

import math

from smog_scale.config.schema import Config, Derived, GroupingConfig
from smog_scale.config.validation import crop_specs


def rows_needed(cfg: Config, derived: Derived) -> int:
    """Cached rows (the union over ranks) a re-grouping needs: ``min_rows_per_group`` x K, or the full caches."""
    grouping = cfg.grouping
    return min(grouping.min_rows_per_group * grouping.num_groups, derived.cache_size_per_device * derived.world_size)


def first_regroup_step(cfg: Config, derived: Derived) -> int:
    """The first optimizer step after which the caches hold :func:`rows_needed` rows.

    Every committed step pushes each global view of the global batch (skipped steps push nothing and do not
    count)."""
    specs = crop_specs(cfg)
    global_views = sum(spec.count for spec in specs if spec.size == specs[0].size)
    return math.ceil(rows_needed(cfg, derived) / (global_views * cfg.optim.global_batch_size))


def first_regroup_after(cfg: Config, derived: Derived) -> int:
    """The optimizer step the first re-grouping follows: when the caches hold enough rows, and not before the
    instance warm-up's last step (``instance_warmup_steps`` committed steps), so SMoG's first step has its groups."""
    return max(first_regroup_step(cfg, derived), cfg.grouping.instance_warmup_steps)


def regroup_due(cfg: Config, derived: Derived, step: int) -> bool:
    """Whether a re-grouping follows optimizer step ``step``.

    As soon as the caches hold enough rows (:func:`first_regroup_step`) and the instance warm-up is over, and
    every ``regroup_every`` steps after that (0: never, nor early)."""
    every, warmup = cfg.grouping.regroup_every, cfg.grouping.instance_warmup_steps
    return every > 0 and step >= warmup and (step % every == 0 or step == first_regroup_after(cfg, derived))


def schedule(cfg: Config, derived: Derived) -> str:
    """One line for the log: when this run re-groups."""
    every = cfg.grouping.regroup_every
    if cfg.model.objective == "byol" or not every:
        return "re-grouping: never (" + ("model.objective=byol)" if every else "grouping.regroup_every=0)")
    warmup = cfg.grouping.instance_warmup_steps
    return (f"re-grouping: first after step {first_regroup_after(cfg, derived)} (when the caches hold "
            f"{rows_needed(cfg, derived)} rows" + (f" and the {warmup}-step instance warm-up is over" if warmup else "")
            + f"), then every {every} steps")


def reset_due(grouping: GroupingConfig, step: int) -> bool:
    """Whether the momentum encoder is reset after step ``step`` on its own period ``reset_every``.

    The resets that come with re-groupings (``reset_every`` null) are
    :func:`smog_scale.training.regrouping.regroup`'s."""
    every = grouping.reset_every
    return grouping.reset_momentum and every is not None and step % every == 0
