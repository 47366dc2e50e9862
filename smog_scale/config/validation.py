"""Recipe files and dotted overrides -> a typed :class:`~smog_scale.config.schema.Config`, validated once.

Values are checked against the schema's annotations (ints accepted where floats are expected), unknown keys
fail with the closest valid one, and checks across fields follow. Errors are ``ConfigError`` with one line
naming the key; ``train.py`` turns them into exit code 2 before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from accelerate.utils import LoggerType

from smog_scale.config.recipe_file import ConfigError, parse_override, read_recipe
from smog_scale.config.schema import Config, DataConfig


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))



def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value



def _unknown_key(full: str, key: str, names: list[str], prefix: str) -> ConfigError:
    """The error for an unknown key, suggesting the closest valid one (spelling, then substring)."""
    close = difflib.get_close_matches(key, names, n=1) or [n for n in names if key in n or n in key][:1]
    hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
    return ConfigError(f"unknown key {full!r}{hint}")



def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(full, str(key), names, prefix)
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a section (mapping), got {value!r}")
            kwargs[key] = _build(hints[key], value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)



def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Recipe YAML (over its ``base``, if it names one), then ``dotted.key=value`` overrides (values parsed as
    YAML), validated."""
    values = read_recipe(Path(path))
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    config = _build(Config, values, "")
    validate(config)
    return config



def _longest_open(data: DataConfig) -> float:
    """Seconds a shard may legitimately take to open: every attempt stalls, with the back-off between."""
    attempts = data.open_attempts
    return attempts * data.stall_timeout_s + data.retry_delay_s * attempts * (attempts - 1) / 2



def validate(config: Config) -> None:
    """Checks across fields that types alone cannot express; raises ConfigError naming the key."""
    run, optim = config.run, config.optim
    trackers = [t.value for t in LoggerType]
    checks = [
        (config.data.train_shards != "", "data.train_shards: no training shards given"),
        (run.log_every >= 1, "run.log_every must be at least 1"),
        (run.save_every >= 1, "run.save_every must be at least 1"),
        (run.max_nonfinite_steps >= 1, "run.max_nonfinite_steps must be at least 1"),
        (run.collective_timeout_s > 0, "run.collective_timeout_s must be positive"),
        (run.seed >= 0, "run.seed must not be negative"),
        (all(t in trackers for t in run.trackers),
         f"run.trackers: {run.trackers} names an unknown tracker; Accelerate's are {', '.join(trackers)}"),
        (optim.base_lr >= 0, "optim.base_lr must not be negative"),
        (optim.final_lr >= 0, "optim.final_lr must not be negative"),
        (0 <= optim.momentum < 1, "optim.momentum must lie in [0, 1)"),
        (len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas), "optim.betas must be 2 values in [0, 1)"),
        (optim.clip_grad_norm is None or optim.clip_grad_norm > 0,
         "optim.clip_grad_norm must be positive (null: no clipping)"),
        (config.optim.global_batch_size > 0, "optim.global_batch_size must be positive"),
        (config.optim.grad_accum_steps > 0, "optim.grad_accum_steps must be positive"),
        (config.optim.epochs > 0, "optim.epochs must be positive"),
        (0 < config.grouping.tau, "grouping.tau must be positive"),
        (0 <= config.grouping.beta_end <= 1 and 0 <= config.grouping.beta_start <= 1,
         "grouping.beta_start/beta_end must lie in [0, 1]"),
        (0 <= config.optim.ema_start <= 1, "optim.ema_start must lie in [0, 1]"),
        (config.grouping.regroup_every >= 0, "grouping.regroup_every must not be negative (0: never re-group)"),
        (config.grouping.reset_every is None or config.grouping.reset_every > 0,
         "grouping.reset_every must be positive (null: reset at each re-grouping)"),
        (config.grouping.reset_every is None or config.grouping.reset_momentum,
         "grouping.reset_every needs grouping.reset_momentum=true"),
        (not config.grouping.reset_momentum or config.grouping.reset_every or config.grouping.regroup_every,
         ("grouping.reset_momentum=true with grouping.regroup_every=0 needs grouping.reset_every (steps between "
          "resets), or set grouping.reset_momentum=false")),
        (config.grouping.num_groups >= 2, "grouping.num_groups must be at least 2"),
        (config.grouping.cache_size >= 1, "grouping.cache_size must be positive"),
        (config.grouping.min_rows_per_group >= 1, "grouping.min_rows_per_group must be at least 1"),
        (config.grouping.instance_warmup_steps >= 0, "grouping.instance_warmup_steps must not be negative"),
        (config.grouping.instance_tau > 0, "grouping.instance_tau must be positive"),
        (config.run.max_steps is None or config.run.max_steps > 0, "run.max_steps must be positive"),
        (config.run.keep_last >= 1, "run.keep_last must be at least 1"),
        (config.data.open_attempts >= 1, "data.open_attempts must be at least 1"),
        (config.data.retry_delay_s >= 0, "data.retry_delay_s must not be negative"),
        (config.data.stall_timeout_s > 0, "data.stall_timeout_s must be positive"),
        (config.data.max_consecutive_failures >= 1, "data.max_consecutive_failures must be at least 1"),
        (config.data.read_timeout_s == 0 or config.data.read_timeout_s > _longest_open(config.data),
         f"data.read_timeout_s={config.data.read_timeout_s:g} must be 0 (no timeout) or exceed a shard's longest "
         f"open, data.open_attempts x data.stall_timeout_s + the retry delays = {_longest_open(config.data):g} s"),
        (config.monitor.knn_every_epochs == 0
         or bool(config.monitor.knn_train_shards and config.monitor.knn_val_shards),
         "monitor.knn_every_epochs needs monitor.knn_train_shards and monitor.knn_val_shards"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    specs = crop_specs(config)
    global_views = sum(spec.count for spec in specs if spec.size == specs[0].size)
    if global_views < 2:
        raise ConfigError("data.crops: the first crop size must have at least 2 views (the global views a, b)")
    if config.model.objective == "smog" and config.grouping.instance_warmup_steps and global_views != 2:
        raise ConfigError("grouping.instance_warmup_steps: the NT-Xent warm-up takes exactly 2 global views "
                          "(data.crops' first size)")



def crop_specs(config: Config) -> list:
    """``data.crops`` as ``multicrop.CropSpec`` records; a bad field fails naming its index and key."""
    from smog_scale.data.multicrop import CropSpec  # torchvision import deferred to validation

    hints = typing.get_type_hints(CropSpec)
    specs = []
    for index, record in enumerate(config.data.crops):
        for key in record:
            if key not in hints:
                raise _unknown_key(f"data.crops[{index}].{key}", key, list(hints), "")
        typed = {key: _coerce(value, hints[key], f"data.crops[{index}].{key}") for key, value in record.items()}
        try:
            specs.append(CropSpec(**typed))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"data.crops[{index}]: {err}") from err
    return specs
