"""WebDataset pipelines over the converter's tar shards (shaped as open_clip's data.py).

Training: shard URLs (resampled with replacement, or shuffled and split by rank then worker) ->
open with bounded retries -> tar samples -> seeded sample shuffle buffer -> decode + multi-crop ->
batch, all inside the DataLoader workers (the DataLoader runs with ``batch_size=None``). An epoch
is a number of samples (``manifest.json`` beside the shards, or ``num_samples``): each worker
yields exactly ``len(loader) / num_workers`` batches through ``with_epoch``.

Every random stream is seeded from (seed, epoch, rank, worker), so a pass is a pure function of
those and ``num_workers``; the loader rebuilds its pipeline on every ``iter``.

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
import json
import logging
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import Pipe
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from smog_scale.data.multicrop import CropSpec, MultiCrop, center_view, collate_views

MANIFEST_NAME = "manifest.json"
_log = logging.getLogger(__name__)

# Salts that give each random stream of a worker its own seed.
_SALT_SHARDS, _SALT_SHUFFLE, _SALT_AUGMENT = 1, 2, 3


class ShardOpenError(OSError):
    """A shard URL could not be opened after the bounded retries; the message names the URL."""


class SkipCounter:
    """webdataset exception handler: log a warning, count the error, continue with the stream."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        _log.warning("skipping a sample or shard after %s", repr(exn)[:500])
        return True

    def take(self) -> int:
        """Return the count since the previous call and reset it."""
        count, self.count = self.count, 0
        return count


def _manifest_path(url: str) -> str:
    """``manifest.json`` beside a local shard path (plain or ``file:``)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("", "file"):
        raise ValueError(
            f"cannot locate {MANIFEST_NAME} for {url!r}: only local shards are looked up; "
            "pass num_samples for http(s):// and pipe: URLs"
        )
    return os.path.join(os.path.dirname(parsed.path if parsed.scheme else url), MANIFEST_NAME)


def _load_manifest(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} at {path}: write shards with tools/make_shards.py, or pass num_samples"
        )
    with open(path) as f:
        return json.load(f)


def shard_urls(urls: str) -> list[str]:
    """The shard list of ``urls``: a folder holding ``manifest.json`` gives the shards it lists;
    anything else is brace-expanded (``::`` joins several patterns)."""
    if os.path.isdir(urls):
        folder = urls
        return [os.path.join(folder, s["name"]) for s in _load_manifest(os.path.join(folder, MANIFEST_NAME))["shards"]]
    return expand_urls(urls)


def check_shards(urls: str) -> list[str]:
    """The shard list, after checking that every local shard exists; raises naming the missing ones."""
    url_list = shard_urls(urls)
    if not url_list:
        raise FileNotFoundError(f"no shards in {urls!r}")
    local = [u for u in url_list if urlparse(u).scheme in ("", "file")]
    missing = [u for u in local if not os.path.isfile(urlparse(u).path if u.startswith("file:") else u)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(url_list)} shards of {urls!r} do not exist: {shown}")
    return url_list


def read_manifest(urls: str) -> dict[str, Any]:
    """The converter's manifest beside the first shard of ``urls`` (local paths only)."""
    return _load_manifest(_manifest_path(shard_urls(urls)[0]))


def count_samples(urls: str) -> int:
    """Samples in exactly the shards ``urls`` names, from the manifests beside them."""
    total = 0
    manifests: dict[str, dict[str, int]] = {}
    for url in shard_urls(urls):
        path = _manifest_path(url)
        if path not in manifests:
            manifests[path] = {s["name"]: s["samples"] for s in _load_manifest(path)["shards"]}
        name = os.path.basename(url)
        if name not in manifests[path]:
            raise ValueError(f"shard {url!r} is not listed in {path}")
        total += manifests[path][name]
    return total


class _ReadAhead:
    """A stream whose first bytes were read to prove it opens; tarfile reads it sequentially."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self._head, self._stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if 0 <= size < len(self._head):
            data, self._head = self._head[:size], self._head[size:]
            return data
        data, self._head = self._head, b""
        return data + self._stream.read(size - len(data) if size >= 0 else -1)

    def close(self) -> None:
        self._stream.close()


def _gopen(url: str, stall_timeout_s: float) -> IO[bytes]:
    """``wds.gopen``, except http(s): webdataset's curl has no stall timeout (a server that stops
    sending hangs the reader forever) and retries up to 30 times itself, so our curl aborts after
    ``stall_timeout_s`` without a connection or a byte, and ``_open_one`` owns the retries."""
    if urlparse(url).scheme not in ("http", "https"):
        return wds.gopen(url)
    seconds = str(max(1, round(stall_timeout_s)))
    return Pipe(["curl", "--connect-timeout", seconds, "--speed-limit", "1", "--speed-time", seconds,
                 "-f", "-s", "-L", url], mode="rb", bufsize=8192, ignore_status=[141, 23])


def _open_one(url: str, attempts: int, delay_s: float, stall_timeout_s: float) -> _ReadAhead:
    """Open ``url`` (``_gopen``); pipe:/curl failures only show on read, so read a block."""
    error: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            stream = _gopen(url, stall_timeout_s)
            head = stream.read(512)
            if not head:
                stream.close()  # a failed command raises its exit status here
                raise OSError("the stream is empty")
            return _ReadAhead(head, stream)
        except Exception as exn:  # noqa: BLE001 - any failure to open is retried, then reported
            error = exn
            _log.warning("opening %s failed (attempt %d/%d): %r", url, attempt, attempts, exn)
            if attempt < attempts:
                time.sleep(delay_s * attempt)
    raise ShardOpenError(f"cannot open shard {url!r} after {attempts} attempts: {error!r}") from error


def _open_shards(src: Iterator[dict], attempts: int, delay_s: float, stall_timeout_s: float) -> Iterator[dict]:
    """``wds.url_opener`` with bounded retries; it neither retries nor sees lazy pipe failures."""
    for sample in src:
        yield dict(sample, stream=_open_one(sample["url"], attempts, delay_s, stall_timeout_s))


def _split_by_rank(src: Iterator[dict], rank: int, world_size: int) -> Iterator[dict]:
    """``wds.split_by_node`` with an explicit rank (it reads torch.distributed or env vars)."""
    for index, item in enumerate(src):
        if index % world_size == rank:
            yield item


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


@dataclass(frozen=True)
class _Streams:
    """The random streams of one rank's epoch, one set per worker.

    A pass resumed at batch ``start_batch`` replays the straight pass exactly: the DataLoader takes
    batches from its workers round-robin, so DataLoader worker i plays worker (i + start_batch) %
    workers, and each worker drops, before decoding, the samples of the batches it already gave.
    """

    seed: int
    epoch: int
    rank: int
    workers: int
    start_batch: int = 0

    def worker(self) -> int:
        return (_worker_id() + self.start_batch) % self.workers

    def seed_for(self, salt: int, passes: int = 0) -> int:
        """Seed of one stream of this worker; SeedSequence keeps distinct tuples apart."""
        entropy = [self.seed, self.epoch, self.rank, self.worker(), salt, passes]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])

    def batches_done(self) -> int:
        """Batches this worker gave before ``start_batch`` in the straight pass."""
        return len(range(self.worker(), self.start_batch, self.workers))


class _Seeded(wds.PipelineStage):
    """Runs ``build(rng)`` on the stream with an RNG seeded per (seed, epoch, rank, worker, pass)."""

    def __init__(self, build: Callable[[random.Random], Callable], streams: _Streams, salt: int):
        self.build, self.streams, self.salt = build, streams, salt
        self.passes = 0

    def run(self, src: Iterator[Any]) -> Iterator[Any]:
        rng = random.Random(self.streams.seed_for(self.salt, self.passes))
        self.passes += 1
        return self.build(rng)(src)


def _split_by_worker(src: Iterator[dict], streams: _Streams) -> Iterator[dict]:
    """``wds.split_by_worker`` over the rotated worker ids of ``streams``."""
    for index, item in enumerate(src):
        if index % streams.workers == streams.worker():
            yield item


def _seed_samples(rng: random.Random) -> Callable:
    """Give every sample its own augmentation seed, so dropping samples never shifts the others'."""
    return wds.map(lambda sample: dict(sample, aug_seed=rng.getrandbits(64)))


class _SkipDone(wds.PipelineStage):
    """Drop, undecoded, the samples of the batches this worker gave before ``start_batch``; the
    count carries over the passes that ``with_epoch`` makes when a worker's shards run short."""

    def __init__(self, streams: _Streams, batch_size: int) -> None:
        self.streams, self.batch_size = streams, batch_size
        self.remaining: int | None = None

    def run(self, src: Iterator[dict]) -> Iterator[dict]:
        if self.remaining is None:
            self.remaining = self.streams.batches_done() * self.batch_size
        for sample in src:
            if self.remaining > 0:
                self.remaining -= 1
                continue
            yield sample


def _shuffle_with(bufsize: int, rng: random.Random) -> Callable:
    return wds.shuffle(bufsize, rng=rng)


def _augment_sample(sample: dict, transform: MultiCrop) -> dict:
    crops = transform(sample["jpg"], random.Random(sample["aug_seed"]))
    return {"crops": crops, "cls": int(sample["cls"]), "key": sample["__key__"]}


def _collate_counting(samples: list[dict], counter: SkipCounter) -> dict[str, Any]:
    return dict(collate_views(samples), skipped=counter.take())


def _read_samples(counter: SkipCounter, attempts: int, delay_s: float, stall_timeout_s: float) -> list[Callable]:
    """Stages from shard URLs to grouped samples; errors inside a shard go to ``counter``."""
    return [
        wds.pipelinefilter(_open_shards)(attempts, delay_s, stall_timeout_s),
        functools.partial(tar_file_expander, handler=counter),
        functools.partial(group_by_keys, handler=counter),
    ]


class ShardLoader:
    """The per-rank epoch iterable: ``len()`` batches per pass; ``set_epoch`` selects the streams.

    Each ``iter`` builds the pipeline for the current epoch and a fresh DataLoader, so a pass
    depends only on (seed, epoch, rank, num_workers) and workers never carry state across epochs.
    """

    def __init__(self, build: Callable[[int], wds.DataPipeline], *, epoch: int, num_batches: int,
                 global_batch_size: int, num_workers: int, pin_memory: bool) -> None:
        self._build, self.epoch, self.num_batches = build, epoch, num_batches
        self.global_batch_size, self.num_workers, self.pin_memory = global_batch_size, num_workers, pin_memory

    @property
    def num_samples(self) -> int:
        """Samples per epoch over all ranks (``num_samples`` rounded down to whole batches)."""
        return self.num_batches * self.global_batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard/sample/augmentation streams the next ``iter`` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = torch.utils.data.DataLoader(
            self._build(self.epoch), batch_size=None, shuffle=False, num_workers=self.num_workers,
            pin_memory=self.pin_memory, worker_init_fn=_ignore_preemption_signals,
        )
        return iter(loader)


def _ignore_preemption_signals(_worker: int) -> None:
    """Workers ignore SIGTERM/SIGUSR1: a cluster signals the whole process group at pre-emption,
    and the trainer, not its loader workers, decides when to stop (after a checkpoint)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _train_pipeline(epoch: int, *, urls: list[str], transform: MultiCrop, batch_size: int,
                    worker_batches: int, seed: int, rank: int, world_size: int, workers: int, start_batch: int,
                    shuffle_buffer: int, resampled: bool, open_attempts: int, retry_delay_s: float,
                    stall_timeout_s: float) -> wds.DataPipeline:
    """The training DataPipeline for one epoch (see the module docstring for the stages)."""
    counter = SkipCounter()
    streams = _Streams(seed, epoch, rank, workers, start_batch)
    if resampled:
        worker_seed = functools.partial(streams.seed_for, _SALT_SHARDS)
        shards: list[Any] = [wds.ResampledShards(urls, worker_seed=worker_seed, deterministic=True)]
    else:
        order_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
        shards = [
            wds.SimpleShardList(urls, seed=order_seed),  # the same order on every rank and worker
            wds.pipelinefilter(_split_by_rank)(rank, world_size),
            wds.pipelinefilter(_split_by_worker)(streams),
        ]
    pipeline = wds.DataPipeline(
        *shards,
        *_read_samples(counter, open_attempts, retry_delay_s, stall_timeout_s),
        _Seeded(functools.partial(_shuffle_with, shuffle_buffer), streams, _SALT_SHUFFLE),
        _Seeded(_seed_samples, streams, _SALT_AUGMENT),
        _SkipDone(streams, batch_size),
        wds.map(functools.partial(_augment_sample, transform=transform), handler=counter),
        wds.batched(batch_size, collation_fn=functools.partial(_collate_counting, counter=counter), partial=False),
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
    open_attempts: int = 3,
    retry_delay_s: float = 1.0,
    stall_timeout_s: float = 30.0,
    pin_memory: bool = False,
    draft: bool = True,
    start_batch: int = 0,
) -> ShardLoader:
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
        open_attempts: attempts to open a shard URL before raising ``ShardOpenError``.
        retry_delay_s: back-off unit between attempts (attempt k waits k x this).
        stall_timeout_s: an http(s) shard whose server gives no connection or no byte for this
            long fails: while opening, the attempt fails (retried, then ``ShardOpenError``); later,
            the rest of the shard is skipped and counted.
        pin_memory: passed to the DataLoader.
        draft: allow reduced-size JPEG decoding where no crop gets upscaled by it.
        start_batch: resume the epoch at this batch: the batches then equal batches
            ``start_batch, start_batch + 1, ...`` of the full pass (exact unless samples before it
            were skipped as corrupt); the skipped samples are read but not decoded. Iterate only
            the ``len(loader) - start_batch`` batches that remain.
    """
    if min(seed, epoch) < 0 or batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need seed, epoch >= 0, batch_size >= 1 and 0 <= rank < world_size; got "
                         f"{seed=}, {epoch=}, {batch_size=}, {rank=}, {world_size=}")
    url_list, workers = shard_urls(urls), max(1, num_workers)
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
        start_batch=start_batch, shuffle_buffer=shuffle_buffer, resampled=resampled, open_attempts=open_attempts,
        retry_delay_s=retry_delay_s, stall_timeout_s=stall_timeout_s,
    )
    return ShardLoader(build, epoch=epoch, num_batches=worker_batches * workers,
                       global_batch_size=batch_size * world_size, num_workers=num_workers, pin_memory=pin_memory)


def _eval_sample(sample: dict, image_size: int) -> tuple[torch.Tensor, int, str]:
    return center_view(sample["jpg"], image_size), int(sample["cls"]), sample["__key__"]


def _collate_eval(samples: list[tuple[torch.Tensor, int, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images, labels, keys = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), list(keys)


def build_eval_loader(
    urls: str,
    *,
    image_size: int = 224,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    open_attempts: int = 3,
    retry_delay_s: float = 1.0,
    stall_timeout_s: float = 30.0,
) -> torch.utils.data.DataLoader:
    """Evaluation batches ``(images float [B,3,S,S] normalized, cls LongTensor[B], keys)``.

    No augmentation and no resampling: shards are split by rank then worker in listed order,
    so every sample is seen exactly once over ranks x workers (the last batches are partial;
    with fewer shards than ranks x workers some workers yield nothing). Corrupt samples are
    skipped with a warning.
    """
    counter = SkipCounter()
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shard_urls(urls)),
        wds.pipelinefilter(_split_by_rank)(rank, world_size),
        wds.split_by_worker,
        *_read_samples(counter, open_attempts, retry_delay_s, stall_timeout_s),
        wds.map(functools.partial(_eval_sample, image_size=image_size), handler=counter),
        wds.batched(batch_size, collation_fn=_collate_eval, partial=True),
    )
    return torch.utils.data.DataLoader(pipeline, batch_size=None, shuffle=False, num_workers=num_workers)
