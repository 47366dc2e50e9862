"""Checks before any work: the paths a recipe names, the trackers, and which keys a resume may change.

Each failure is a ``ConfigError`` with one line naming the key; ``train.py`` exits 2 with it before the
first step. What ``validation.validate`` can check from the recipe alone lives there, the training shards
are checked where the launch's values are derived (``derived.samples_per_epoch``), and a checkpoint's
recipe is compared by ``training.run_dir`` with :func:`resume_differences`; this module holds the checks
that look at the filesystem and the installed packages, and the comparison of two resolved recipes.
"""

from __future__ import annotations

import os
import reprlib
from pathlib import Path
from typing import Any

from accelerate.tracking import get_available_trackers

from smog_scale.config.recipe_file import ConfigError
from smog_scale.config.schema import Config, flatten, to_dict
from smog_scale.data.shard_list import check_shards

# Keys that may differ between a checkpoint's recipe and the recipe resuming it, each with the reason.
# Every other key, including any key added to the schema later, must match: a new key is refused on
# resume until it is listed here. A key names itself or its whole section ("monitor").
MAY_CHANGE_ON_RESUME: dict[str, str] = {
    "run.output_dir": "where this launch writes (a checkpoint may seed a new folder)",
    "run.max_steps": "where this launch stops; the schedules keep their full length",
    "run.log_every": "logging only",
    "run.save_every": "checkpointing only",
    "run.keep_last": "checkpointing only",
    "run.resume": "how this launch finds its checkpoint",
    "run.overwrite": "how this launch treats the folder",
    "run.trackers": "logging only",
    "run.max_nonfinite_steps": "a guard rail, not the training",
    "run.mixed_precision": "the launcher's precision may change too",
    "run.cudnn_benchmark": "how cuDNN picks its algorithms, not what they compute",
    "run.collective_timeout_s": "a guard rail, not the training",
    "run.tf32": "float32 rounding, as the launcher's precision may change too",
    "data.pin_memory": "loading only",
    "data.persistent_workers": "loading only (the batches are the same)",
    "data.train_shards": "the shards may move (e.g. to node-local disk); their size is checked: derived.num_samples",
    "data.num_workers": "loading only (a change of derived.steps_per_epoch it causes is still refused)",
    "data.shuffle_buffer": "loading only; the sample order changes on resume anyway (README)",
    "data.open_attempts": "shard reading only",
    "data.retry_delay_s": "shard reading only",
    "data.stall_timeout_s": "shard reading only",
    "model.compile": "the same network, compiled or not",
    "model.channels_last": "the same network in another memory layout",
    "grouping.cache_size": "elastic resume: the saved caches are pooled and dealt to the new caches",
    "grouping.kmeans_mode": "gather and sharded cluster the same union of the caches",
    "optim.grad_accum_steps": "fits the per-device batch to a new world size; the global batch is kept",
    "monitor": "the kNN monitor only reads the model",
    "derived.world_size": "elastic resume (not under DeepSpeed: run_dir.check_deepspeed_resume)",
    "derived.batch_size_per_device": "follows the world size and accumulation; the global batch is kept",
    "derived.cache_size_per_device": "follows the world size; the union grouping.cache_size is kept",
}
_ABSENT = "<absent>"


def check_paths(cfg: Config) -> None:
    """The monitor's shards when the monitor is on, the run folder, and the trackers' packages."""
    if cfg.monitor.knn_every_epochs:
        for key in ("knn_train_shards", "knn_val_shards"):
            try:
                check_shards(getattr(cfg.monitor, key))
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"monitor.{key}: {err} (or turn the monitor off: monitor.knn_every_epochs=0)") \
                    from err
    check_output_dir(Path(cfg.run.output_dir))
    available = {str(t) for t in get_available_trackers()}
    missing = [t for t in cfg.run.trackers if t != "all" and t not in available]
    if missing:
        raise ConfigError(f"run.trackers: {', '.join(missing)} not installed (pip install it, or drop it: "
                          f"run.trackers=[{', '.join(t for t in cfg.run.trackers if t not in missing)}])")


def check_output_dir(path: Path) -> None:
    """``run.output_dir`` is a writable folder, created if missing."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run.output_dir: {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"run.output_dir: cannot create {path}: {err.strerror or err}") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"run.output_dir: {path} is not writable")


def may_change_on_resume(key: str) -> bool:
    return any(key == allowed or key.startswith(f"{allowed}.") for allowed in MAY_CHANGE_ON_RESUME)


def resume_differences(current: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """Dotted keys, as ``"key (checkpoint X, now Y)"``, whose values differ between two resolved recipe
    trees (``schema.resolved``: the config plus its ``derived`` section) and may not change on resume.
    A key the saved recipe lacks (added to the schema since) compares against its default."""
    now, then = flatten(current), flatten(saved)
    defaults = flatten(to_dict(Config()))
    differ = []
    for key in [*now, *(k for k in then if k not in now)]:
        old, new = then.get(key, defaults.get(key, _ABSENT)), now.get(key, _ABSENT)
        if old != new and not may_change_on_resume(key):
            differ.append(f"{key} (checkpoint {reprlib.repr(old)}, now {reprlib.repr(new)})")
    return differ
