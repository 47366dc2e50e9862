"""WebDataset pipelines over the converter's tar shards (shaped as open_clip's data.py).

Training: shard URLs (resampled with replacement, or shuffled and split by rank then worker) ->
open with bounded retries -> tar samples -> seeded sample shuffle buffer -> decode + multi-crop ->
batch, all inside the DataLoader workers (the DataLoader runs with ``batch_size=None``). An epoch
is a number of samples (``manifest.json`` beside the shards, or ``num_samples``): each worker
yields exactly ``len(loader) / num_workers`` batches through ``with_epoch``.

Every random stream is seeded from (seed, epoch, rank, worker), so a pass is a pure function of
those and ``num_workers`` (``seeded_streams``); the workers rebuild the pipeline on every ``iter``, from
the epoch and start batch that ``set_epoch`` chose, whether they are new or persistent (``shard_loader``).

Neither loader can spin or hang: ``max_consecutive_failures`` samples or shards in a row that fail
raise ``SampleFailures``; with worker processes, no batch within ``read_timeout_s`` raises
``ShardStallError`` naming the shard a worker is stuck reading (``shard_reading.ReadBoard``). Errors
from a worker reach the caller as the same type with a one-line message. Workers ignore
SIGTERM/SIGUSR1 from their start (pre-emption is the trainer's to handle). Shard lists, manifests and
the startup check are in ``shard_list``, opening and the failure guard in ``shard_reading``, the
DataLoader and its workers in ``shard_loader``; this module is the package's entry point to all four.

Batch layout (dict)::

    crops:   list of uint8 [V_s, B, 3, S, S], one per distinct crop size S in order of first
             appearance in ``crops`` (global views first), see ``multicrop.collate_views``
    cls:     LongTensor[B]
    key:     list[str], the samples' ``__key__``
    skipped: int, samples/shard errors this worker skipped since its previous batch; sum it
             over workers and ranks (one per corrupt sample; a truncated or unreadable shard
             adds one or more, the samples lost with it cannot be known)
"""

from __future__ import annotations

import functools
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from smog_scale.data.multicrop import CropSpec, MultiCrop, center_view, collate_views
from smog_scale.data.seeded_streams import (
    SALT_AUGMENT,
    SALT_SHARDS,
    SALT_SHUFFLE,
    Seeded,
    SkipDone,
    Streams,
    seed_samples,
    shuffle_with,
    split_by_worker,
)
from smog_scale.data.shard_list import (
    MANIFEST_NAME,
    ShardCheckError,
    ShardError,
    check_shards,
    count_samples,
    read_manifest,
    sample_counts,
    shard_urls,
)
from smog_scale.data.shard_loader import ShardLoader, TrainLoader
from smog_scale.data.shard_reading import (
    FailureGuard,
    ReadBoard,
    SampleFailures,
    ShardOpenError,
    ShardStallError,
)

__all__ = [
    "MANIFEST_NAME", "SampleFailures", "ShardCheckError", "ShardError", "ShardLoader", "ShardOpenError",
    "ShardStallError", "TrainLoader", "build_eval_loader", "build_train_loader", "check_shards", "count_samples",
    "cpu_worker_note", "read_manifest", "shard_urls",
]


@dataclass(frozen=True)
class _Reading:
    """How shards are opened and how long a loader waits (see ``build_train_loader``)."""

    open_attempts: int = 3
    retry_delay_s: float = 1.0
    stall_timeout_s: float = 30.0
    read_timeout_s: float = 300.0
    max_consecutive_failures: int = 1000


def _split_by_rank(src: Iterator[dict], rank: int, world_size: int) -> Iterator[dict]:
    """``wds.split_by_node`` with an explicit rank (it reads torch.distributed or env vars)."""
    for index, item in enumerate(src):
        if index % world_size == rank:
            yield item


def _augment_sample(sample: dict, transform: MultiCrop) -> dict:
    crops = transform(sample["jpg"], random.Random(sample["aug_seed"]))
    return {"crops": crops, "cls": int(sample["cls"]), "key": sample["__key__"]}


def _collate_counting(samples: list[dict], guard: FailureGuard) -> dict[str, Any]:
    return dict(collate_views(samples), skipped=guard.take())


def _read_samples(guard: FailureGuard, reading: _Reading, board: ReadBoard) -> list[Callable]:
    """Stages from shard URLs to grouped samples; errors inside a shard go to ``guard``."""
    return [
        wds.pipelinefilter(guard.open_shards)(reading.open_attempts, reading.retry_delay_s, reading.stall_timeout_s,
                                              board),
        functools.partial(tar_file_expander, handler=guard),
        functools.partial(group_by_keys, handler=guard),
    ]


def _train_pipeline(epoch: int, start_batch: int, board: ReadBoard, *, urls: list[str], transform: MultiCrop,
                    batch_size: int, worker_batches: int, seed: int, rank: int, world_size: int, workers: int,
                    shuffle_buffer: int, resampled: bool, reading: _Reading) -> wds.DataPipeline:
    """The training DataPipeline for one epoch from ``start_batch`` (see the module docstring for the stages)."""
    guard = FailureGuard(reading.max_consecutive_failures)
    streams = Streams(seed, epoch, rank, workers, start_batch)
    if resampled:
        worker_seed = functools.partial(streams.seed_for, SALT_SHARDS)
        shards: list[Any] = [wds.ResampledShards(urls, worker_seed=worker_seed, deterministic=True)]
    else:
        order_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
        shards = [
            wds.SimpleShardList(urls, seed=order_seed),  # the same order on every rank and worker
            wds.pipelinefilter(_split_by_rank)(rank, world_size),
            wds.pipelinefilter(split_by_worker)(streams),
        ]
    pipeline = wds.DataPipeline(
        *shards,
        *_read_samples(guard, reading, board),
        Seeded(functools.partial(shuffle_with, shuffle_buffer), streams, SALT_SHUFFLE),
        Seeded(seed_samples, streams, SALT_AUGMENT),
        SkipDone(streams, batch_size),
        wds.pipelinefilter(guard.decode)(functools.partial(_augment_sample, transform=transform)),
        wds.batched(batch_size, collation_fn=functools.partial(_collate_counting, guard=guard), partial=False),
    )
    return pipeline.with_epoch(nbatches=worker_batches)


def build_train_loader(
    urls: str,
    *,
    crops: Sequence[CropSpec],
    batch_size: int,
    num_workers: int,
    seed: int,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_samples: int | None = None,
    shuffle_buffer: int = 1000,
    resampled: bool = True,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    draft: bool = True,
    start_batch: int = 0,
    **reading: Any,
) -> TrainLoader:
    """Multi-crop training batches from shards ``urls`` for one rank; see the module docstring.

    Args:
        urls: brace-expanded shard pattern(s), local paths, ``http(s)://`` or ``pipe:`` commands;
            several patterns are joined with ``::``.
        crops: the multi-crop records (``multicrop.byol_crops``).
        batch_size: per-rank batch size (``batch_size_per_device``).
        num_workers: DataLoader workers; batches per epoch are split evenly over them.
        seed, epoch, rank: select every random stream; equal values give equal batches.
        world_size: number of ranks; the global batch is ``batch_size * world_size``.
        num_samples: samples per epoch; default the manifests' count for the shards in ``urls``.
        shuffle_buffer: samples in each worker's shuffle buffer (held as encoded bytes, before decoding).
        resampled: draw shards with replacement (training default). Without it, shards are
            shuffled per epoch and split by rank then worker: needs shards >= workers x ranks.
        pin_memory: passed to the DataLoader.
        persistent_workers: with ``num_workers > 0``, start the workers once and keep them across passes
            (``set_epoch`` selects each one; the batches are those of a loader built for that epoch);
            ``close()`` shuts them down. An error in a pass shuts them down either way.
        draft: allow reduced-size JPEG decoding where no crop gets upscaled by it.
        start_batch: resume the epoch at this batch: the batches then equal batches
            ``start_batch, start_batch + 1, ...`` of the full pass (exact unless samples before it
            were skipped as corrupt); the skipped samples are read but not decoded. Iterate only
            the ``len(loader) - start_batch`` batches that remain.
        reading: how shards are read, all optional:
            ``open_attempts`` (3): attempts to open a shard URL before raising ``ShardOpenError``;
            ``retry_delay_s`` (1.0): back-off unit between attempts (attempt k waits k x this);
            ``stall_timeout_s`` (30): an http(s) shard whose server gives no connection or no byte for
            this long fails: while opening, the attempt fails (retried, then ``ShardOpenError``);
            later, the rest of the shard is skipped and counted;
            ``read_timeout_s`` (300): with worker processes, waiting longer than this for a batch
            raises ``ShardStallError`` naming the shard a worker is stuck reading (any URL kind;
            0: wait forever);
            ``max_consecutive_failures`` (1000): samples or shards in a row that fail before
            ``SampleFailures`` names the first of them.
    """
    if min(seed, epoch, start_batch) < 0 or batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need seed, epoch, start_batch >= 0, batch_size >= 1 and 0 <= rank < world_size; got "
                         f"{seed=}, {epoch=}, {batch_size=}, {rank=}, {world_size=}")
    url_list, workers, options = shard_urls(urls), max(1, num_workers), _Reading(**reading)
    if not resampled and len(url_list) < workers * world_size:
        raise ValueError(f"{len(url_list)} shards cannot feed {workers} workers x {world_size} ranks without "
                         "resampling: use resampled=True, fewer workers, or more (smaller) shards")
    epoch_samples = count_samples(urls) if num_samples is None else num_samples
    worker_batches = epoch_samples // (batch_size * world_size) // workers
    if worker_batches < 1:
        raise ValueError(f"an epoch of {epoch_samples} samples is less than one batch of {batch_size} "
                         f"for each of {workers} workers x {world_size} ranks")
    build = functools.partial(
        _train_pipeline, urls=url_list, transform=MultiCrop(crops, draft=draft), batch_size=batch_size,
        worker_batches=worker_batches, seed=seed, rank=rank, world_size=world_size, workers=workers,
        shuffle_buffer=shuffle_buffer, resampled=resampled, reading=options,
    )
    return TrainLoader(build, epoch=epoch, start_batch=start_batch, num_batches=worker_batches * workers,
                       global_batch_size=batch_size * world_size, num_workers=num_workers, pin_memory=pin_memory,
                       read_timeout_s=options.read_timeout_s, persistent_workers=persistent_workers)


def cpu_worker_note(num_workers: int, device: torch.device) -> str | None:
    """Why a CPU run's ``num_workers`` loader processes slow its steps, or None when they have cores of their own.

    On a CPU the step's compute threads (``torch.get_num_threads()``) run every parallel op to a barrier:
    a worker decoding meanwhile takes a core from one thread and the op waits for it, so the step loses
    more than the decoding time (issue 22, benchmarks/README.md). Without a spare core, decoding in the
    training process between steps (``data.num_workers=0``) costs just the decoding time. On a GPU the
    training process mostly waits for the device: workers as the recipe says.
    """
    cores = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    spare = max(cores - torch.get_num_threads(), 0)
    if device.type != "cpu" or num_workers <= spare:
        return None
    return (f"data.num_workers={num_workers} loader processes compete with {torch.get_num_threads()} compute "
            f"threads for {cores} cores and slow every step: set data.num_workers={spare} (0: decode in the "
            "training process) or fewer threads (OMP_NUM_THREADS)")


def _eval_sample(sample: dict, image_size: int) -> tuple[torch.Tensor, int, str]:
    return center_view(sample["jpg"], image_size), int(sample["cls"]), sample["__key__"]


def _collate_eval(samples: list[tuple[torch.Tensor, int, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images, labels, keys = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), list(keys)


def _eval_pipeline(_epoch: int, _start_batch: int, board: ReadBoard, *, urls: list[str], image_size: int,
                   batch_size: int, rank: int, world_size: int, reading: _Reading) -> wds.DataPipeline:
    guard = FailureGuard(reading.max_consecutive_failures)
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.pipelinefilter(_split_by_rank)(rank, world_size),
        wds.split_by_worker,
        *_read_samples(guard, reading, board),
        wds.pipelinefilter(guard.decode)(functools.partial(_eval_sample, image_size=image_size)),
        wds.batched(batch_size, collation_fn=_collate_eval, partial=True),
    )


def _eval_batches(urls: list[str], batch_size: int, workers: int, rank: int, world_size: int) -> int | None:
    """Batches this rank's evaluation loader yields, from the manifests (None without them): shards
    go to ranks then workers round-robin, and each worker ends with a partial batch."""
    try:
        mine = sample_counts(urls)[rank::world_size]
    except (OSError, ValueError, KeyError):
        return None
    return sum(math.ceil(sum(mine[worker::workers]) / batch_size) for worker in range(workers))


def build_eval_loader(
    urls: str,
    *,
    image_size: int = 224,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    **reading: Any,
) -> ShardLoader:
    """Evaluation batches ``(images float [B,3,S,S] normalized, cls LongTensor[B], keys)``.

    No augmentation and no resampling: shards are split by rank then worker in listed order,
    so every sample is seen exactly once over ranks x workers (the last batches are partial;
    with fewer shards than ranks x workers some workers yield nothing). Corrupt samples are
    skipped with a warning; ``reading`` takes the options of ``build_train_loader``.
    """
    url_list, options = shard_urls(urls), _Reading(**reading)
    build = functools.partial(_eval_pipeline, urls=url_list, image_size=image_size, batch_size=batch_size,
                              rank=rank, world_size=world_size, reading=options)
    num_batches = _eval_batches(url_list, batch_size, max(1, num_workers), rank, world_size)
    return ShardLoader(build, epoch=0, num_batches=num_batches, num_workers=num_workers, pin_memory=False,
                       read_timeout_s=options.read_timeout_s)
