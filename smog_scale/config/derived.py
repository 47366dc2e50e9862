"""Values derived for a launch: per-device batch, schedule lengths, scaled learning rate, cache shares.

Computed from a frozen config and the world size, logged and saved, never written back into the config.
"""

from __future__ import annotations

from smog_scale.config.recipe_file import ConfigError
from smog_scale.config.schema import Config, Derived
from smog_scale.data.shard_list import check_shards, count_samples


def samples_per_epoch(cfg: Config) -> int:
    """Samples per epoch: the recipe's, else the shards' manifests; missing shards fail here."""
    try:
        check_shards(cfg.data.train_shards)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.train_shards: {err}") from err
    if cfg.data.num_samples is not None:
        return cfg.data.num_samples
    try:
        return count_samples(cfg.data.train_shards)
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise ConfigError(f"data.num_samples is not set and no manifest gives it: {err}") from err


def derive(config: Config, world_size: int, num_samples: int | None = None) -> Derived:
    """Per-device batch, schedule lengths and the scaled learning rate for this launch.

    ``num_samples``: samples per epoch; by default :func:`samples_per_epoch` (the recipe's, else the shards'
    manifests, after checking the training shards).

    Raises ConfigError when the global batch does not split evenly over ranks x accumulation, when
    the union of the feature caches (each rank's share of ``grouping.cache_size``) cannot hold K groups, when
    an epoch is shorter than a step, or when the instance warm-up takes the whole run.
    """
    if num_samples is None:
        num_samples = samples_per_epoch(config)
    optim, grouping = config.optim, config.grouping
    split = world_size * optim.grad_accum_steps
    if optim.global_batch_size % split:
        raise ConfigError(
            f"optim.global_batch_size={optim.global_batch_size} is not divisible by world size {world_size} "
            f"x optim.grad_accum_steps={optim.grad_accum_steps}"
        )
    share = grouping.cache_size // world_size
    if config.model.objective == "smog" and grouping.num_groups > share * world_size:
        raise ConfigError(
            f"grouping.num_groups={grouping.num_groups} exceeds the feature cache: grouping.cache_size="
            f"{grouping.cache_size} leaves each of {world_size} rank(s) {share} rows ({share * world_size} in all), "
            f"below K / world size = {grouping.num_groups / world_size:g}"
        )
    # What the loader yields per rank: whole batches, split evenly over its workers.
    workers = max(1, config.data.num_workers)
    batches_per_rank = num_samples // (optim.global_batch_size // optim.grad_accum_steps) // workers * workers
    steps_per_epoch = batches_per_rank // optim.grad_accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"data.num_samples={num_samples} gives no whole step of optim.global_batch_size="
                          f"{optim.global_batch_size} for each of data.num_workers={workers} loader workers")
    total_steps = steps_per_epoch * optim.epochs
    if config.model.objective == "smog" and grouping.instance_warmup_steps >= total_steps:
        raise ConfigError(f"grouping.instance_warmup_steps={grouping.instance_warmup_steps} leaves no SMoG step of the "
                          f"run's {total_steps} ({steps_per_epoch} per epoch x optim.epochs={optim.epochs})")
    return Derived(
        world_size=world_size,
        batch_size_per_device=optim.global_batch_size // split,
        num_samples=num_samples,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=round(steps_per_epoch * optim.warmup_epochs),
        scaled_lr=optim.base_lr * optim.global_batch_size / 256,
        cache_size_per_device=share,
    )
