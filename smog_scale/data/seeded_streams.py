"""The seeded random streams of a rank's training pass, and the stages that replay a pass from a batch on.

Every random stream (shard order, sample shuffle, augmentation) is seeded from (seed, epoch, rank,
worker, salt), so a pass is a pure function of those and the number of loader workers, and a pass
resumed at a batch gives exactly the batches the straight pass gave from there.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds

# Salts that give each random stream of a worker its own seed.
SALT_SHARDS, SALT_SHUFFLE, SALT_AUGMENT = 1, 2, 3



def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0



@dataclass(frozen=True)
class Streams:
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



class Seeded(wds.PipelineStage):
    """Runs ``build(rng)`` on the stream with an RNG seeded per (seed, epoch, rank, worker, pass)."""

    def __init__(self, build: Callable[[random.Random], Callable], streams: Streams, salt: int):
        self.build, self.streams, self.salt = build, streams, salt
        self.passes = 0

    def run(self, src: Iterator[Any]) -> Iterator[Any]:
        rng = random.Random(self.streams.seed_for(self.salt, self.passes))
        self.passes += 1
        return self.build(rng)(src)



def split_by_worker(src: Iterator[dict], streams: Streams) -> Iterator[dict]:
    """``wds.split_by_worker`` over the rotated worker ids of ``streams``."""
    for index, item in enumerate(src):
        if index % streams.workers == streams.worker():
            yield item



def seed_samples(rng: random.Random) -> Callable:
    """Give every sample its own augmentation seed, so dropping samples never shifts the others'."""
    return wds.map(lambda sample: dict(sample, aug_seed=rng.getrandbits(64)))



class SkipDone(wds.PipelineStage):
    """Drop, undecoded, the samples of the batches this worker gave before ``start_batch``; the
    count carries over the passes that ``with_epoch`` makes when a worker's shards run short."""

    def __init__(self, streams: Streams, batch_size: int) -> None:
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



def shuffle_with(bufsize: int, rng: random.Random) -> Callable:
    return wds.shuffle(bufsize, rng=rng)
