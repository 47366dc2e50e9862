"""The recipe schema: nested dataclasses loaded from YAML (``smog_scale.config.recipe_file``) plus dotted overrides,
validated once.

Every field's comment gives its source or recommended range and how it fails. Errors are
``ConfigError`` with one line naming the key; ``train.py`` turns them into exit code 2 before any
work starts. Derived values (``global_batch_size``, ``scaled_lr``, ...) are computed from a frozen
config by ``derived()``, never written back into it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from accelerate.utils import LoggerType

from smog_scale.config.recipe_file import ConfigError, parse_override, read_recipe


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/default"  # run folder: config.yaml, metrics.jsonl, checkpoints/, tensorboard/
    max_steps: int | None = None  # stop after this many steps; schedules keep their full-length shape
    seed: int = 0  # >= 0
    log_every: int = 10  # steps between metric reductions across ranks (each one syncs)
    save_every: int = 1000  # steps between checkpoints; one is always written at the end
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted
    resume: str = "auto"  # "auto": newest checkpoint of output_dir that loads; "never"; or a checkpoint path
    overwrite: bool = False  # with resume "never": start over in a folder with checkpoints (they are moved aside)
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # Accelerate's: also "wandb", "mlflow"...
    max_nonfinite_steps: int = 20  # consecutive skipped (non-finite) steps before the job stops
    mixed_precision: Literal["launcher", "no", "bf16", "fp16"] = "launcher"  # "launcher": accelerate's flag


@dataclass(frozen=True)
class DataConfig:
    train_shards: str = ""  # WebDataset URL pattern: /path/in1k-{000000..001023}.tar, http(s)://..., pipe:...
    num_samples: int | None = None  # samples per epoch; read from manifest.json beside the shards if unset
    num_workers: int = 8  # loader processes per rank; 8-12 per GPU at 224 px with multi-crop
    shuffle_buffer: int = 5000  # samples; larger mixes better, costs memory (~100 kB per sample)
    open_attempts: int = 3  # tries to open a shard URL before the run stops naming it
    retry_delay_s: float = 1.0  # back-off unit between those tries (try k waits k x this)
    stall_timeout_s: float = 30.0  # an http(s) shard silent this long is retried (opening) or skipped (midway)
    # No batch from the loader workers for this long (a stalled pipe: command or network filesystem,
    # any URL kind) ends the job naming the shard a worker is stuck on; 0: wait forever. Must exceed a
    # shard's longest legitimate open (open_attempts x stall_timeout_s + the retry delays).
    read_timeout_s: float = 300.0
    # Samples or shards in a row that fail (nothing decodes: HTML instead of tar, images under another
    # key, a crop that cannot be made) before the job stops naming the first; real corruption is sparse.
    max_consecutive_failures: int = 1000
    # Crop records (multicrop.CropSpec fields); global crops first. BYOL asymmetric recipe by default.
    crops: list[dict[str, Any]] = field(
        default_factory=lambda: [
            dict(size=224, count=1, scale=[0.14, 1.0], blur_p=1.0, solarize_p=0.0),
            dict(size=224, count=1, scale=[0.14, 1.0], blur_p=0.1, solarize_p=0.2),
        ]
    )


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet50"  # any timm name, plus resnet50x2 / resnet50x4 (SimCLR widths)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    proj_hidden_dim: int = 2048  # docs/method.md "Networks" (BYOL)
    proj_dim: int = 128  # D, the group feature dimension (paper)
    pred_hidden_dim: int = 2048
    sync_bn: bool = True  # SyncBatchNorm in backbone and heads with several CUDA ranks (CPU ranks: per-rank BN)
    channels_last: bool = True  # faster convolutions on GPU; ignored for transformers
    compile: bool = False  # torch.compile the model
    # "smog": group contrast (docs/method.md); "byol": the instance-level control, the same networks with
    # BYOL's loss and no grouping (every grouping.* key is then unused: no k-means, cache or G updates)
    objective: Literal["smog", "byol"] = "smog"


@dataclass(frozen=True)
class GroupingConfig:
    num_groups: int = 3000  # K (paper 7c: 300 -> 65.2, 1000 -> 67.0, 3000 -> 67.2 top-1 at 100 ep)
    tau: float = 0.1  # temperature (paper); below 0.05 the loss becomes peaky and unstable
    beta_schedule: Literal["linear", "fixed"] = "linear"  # paper 7a: linear 1.0 -> 0.99 67.2, fixed 0.99 65.9
    beta_start: float = 1.0  # group momentum beta at step 0 (linear schedule only)
    beta_end: float = 0.99  # beta at the last step; the fixed schedule's value
    update: Literal["momentum", "adopt_latest", "averaging", "random_select"] = "momentum"  # paper 7d; docs/method.md
    regroup_every: int = 300  # steps between k-means re-groupings (our choice; paper: "periodically"); 0: never
    reset_momentum: bool = True  # reset the momentum encoder to the online one periodically (paper 7b)
    reset_every: int | None = None  # steps between resets; null: at each re-grouping (needs regroup_every > 0)
    # Features k-means clusters: the union of the ranks' FIFO caches, each rank keeping cache_size // world size
    # (the remainder is dropped, derived.cache_size_per_device says how many); the union must hold K rows.
    cache_size: int = 65536
    # A re-grouping needs the caches to hold this many rows per group (or to be full): the first one comes at the
    # first step they do, before step regroup_every, so that G does not stay random (docs/method.md). >= 1.
    min_rows_per_group: int = 10
    cache_features: Literal["momentum", "online"] = "momentum"  # docs/method.md step 6 (choice)
    kmeans_mode: Literal["gather", "sharded"] = "gather"  # "sharded" when the union does not fit one rank
    kmeans_iters: int = 20


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["lars", "sgd", "adamw"] = "lars"  # LARS for ResNets (BYOL), AdamW for Swin (MoCo v3)
    epochs: int = 400
    global_batch_size: int = 4096  # images per optimizer step over all ranks (paper: 4096; 2048 for 400 ep)
    grad_accum_steps: int = 1  # per-device batch = global / (world size * accumulation); must divide
    base_lr: float = 0.3  # per 256 images: lr = base_lr * global_batch / 256 (BYOL: 0.2-0.3 with LARS)
    final_lr: float = 0.0
    warmup_epochs: float = 10.0  # per-step linear warm-up (BYOL)
    weight_decay: float = 1.5e-6  # BYOL LARS; AdamW recipes use 0.05 (MoCo v3)
    momentum: float = 0.9  # SGD/LARS momentum
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    trust_coeff: float = 0.001  # LARS trust coefficient (timm default)
    ema_start: float = 0.99  # momentum encoder m: cosine 0.99 -> 1.0 (BYOL)
    clip_grad_norm: float | None = None  # clip the global gradient norm (> 0); None: no clipping


@dataclass(frozen=True)
class MonitorConfig:
    knn_every_epochs: int = 0  # weighted kNN (k=20, T=0.07) of the online backbone every N epochs; 0: off
    knn_train_shards: str = ""  # labelled shards whose features vote (a held-out subset keeps it cheap)
    knn_val_shards: str = ""  # labelled shards that are classified
    image_size: int = 224  # center crop of the monitor's images
    batch_size: int = 256  # images per rank per extraction batch


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    grouping: GroupingConfig = field(default_factory=GroupingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


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


def load(path: str | Path, overrides: Sequence[str] = ()) -> Config:
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
    if sum(spec.count for spec in specs if spec.size == specs[0].size) < 2:
        raise ConfigError("data.crops: the first crop size must have at least 2 views (the global views a, b)")


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


@dataclass(frozen=True)
class Derived:
    """Values computed from the config and the launch, logged and saved; never written into the config."""

    world_size: int
    batch_size_per_device: int
    num_samples: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    scaled_lr: float
    cache_size_per_device: int  # grouping.cache_size // world_size rows in each rank's feature cache


def derive(config: Config, world_size: int, num_samples: int) -> Derived:
    """Per-device batch, schedule lengths and the scaled learning rate for this launch.

    Raises ConfigError when the global batch does not split evenly over ranks x accumulation, when
    the union of the feature caches (each rank's share of ``grouping.cache_size``) cannot hold K groups, or
    when an epoch is shorter than a step.
    """
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
    return Derived(
        world_size=world_size,
        batch_size_per_device=optim.global_batch_size // split,
        num_samples=num_samples,
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * optim.epochs,
        warmup_steps=round(steps_per_epoch * optim.warmup_epochs),
        scaled_lr=optim.base_lr * optim.global_batch_size / 256,
        cache_size_per_device=share,
    )


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested tree as ``{"dotted.key": leaf}``; lists and empty mappings are leaves."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolved(config: Config, derived: Derived | None = None) -> dict[str, Any]:
    """The resolved config as a tree, plus a ``derived`` section with the values derived for this launch."""
    tree = to_dict(config)
    if derived is not None:
        tree["derived"] = dataclasses.asdict(derived)
    return tree


def dump(config: Config, path: str | Path, derived: Derived | None = None) -> None:
    """Write the resolved config (and the values derived for this launch) as YAML."""
    Path(path).write_text(yaml.safe_dump(resolved(config, derived), sort_keys=False))
