"""The recipe schema: nested frozen dataclasses, one per recipe section, and the values derived for a launch.

Every field's comment gives its source or recommended range and how it fails. Recipes become a
``Config`` through :mod:`smog_scale.config.validation`; :mod:`smog_scale.config.derived` computes a
``Derived``. The resolved tree of both is what a run saves as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


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
    # CUDA only. cuDNN times its convolution algorithms for each new input shape and keeps the fastest (the shapes
    # here are fixed); off: its heuristic choice, and the same algorithm run to run (bit-exact reruns need more).
    cudnn_benchmark: bool = True
    # Seconds a collective may wait for the other ranks before the process group ends the job (NCCL's default
    # 600, gloo's 1800). A rank whose loader fails stops the others at once (training/loop.py, agreed); this bounds
    # any other error on one rank. It must exceed the longest wait between ranks: a checkpoint save, a re-grouping.
    collective_timeout_s: float = 1800.0
    # CUDA only. TensorFloat-32 for float32 matmuls and convolutions (10-bit mantissa, as bf16 autocast's 7 is
    # coarser still): several times faster on A100/H100 without mixed precision; off: full float32.
    tf32: bool = True



@dataclass(frozen=True)
class DataConfig:
    train_shards: str = ""  # WebDataset URL pattern: /path/in1k-{000000..001023}.tar, http(s)://..., pipe:...
    num_samples: int | None = None  # samples per epoch; read from manifest.json beside the shards if unset
    # Loader processes per rank: 8-12 per GPU at 224 px with multi-crop. On a CPU run 0 unless cores are spare
    # beyond the compute threads: a worker decoding during the step slows it by more than the decoding
    # takes (the run log says so); 0 decodes in the training process between steps (issue 22).
    num_workers: int = 8
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
    # CUDA only. The loader's batches in page-locked memory, so that their copy to the GPU (non_blocking) overlaps
    # compute instead of waiting for the stream; off if the host is short of memory (costs one batch per worker).
    pin_memory: bool = True
    # With num_workers > 0, the training loader's workers start once per launch and serve every epoch (each
    # epoch's batches and order are those of a loader built for it); off: new workers every epoch.
    persistent_workers: bool = True
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
    # torch.compile the networks (inductor; in place, before DDP / DeepSpeed wrap them). The first step compiles
    # (minutes on a CPU, and again for each new crop resolution); later steps run the compiled graphs.
    compile: bool = False
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
    # Instance-contrastive warm-up (docs/method.md "Instance warm-up"; our choice, off in the paper's recipes): for
    # the first N optimizer steps the loss is NT-Xent over the online projector outputs of the global views (every
    # image its own group), G stays as it is and the caches fill; the first re-grouping follows step N.
    instance_warmup_steps: int = 0
    instance_tau: float = 0.2  # NT-Xent temperature of the warm-up (SimCLR's small-data value)



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
