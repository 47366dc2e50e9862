"""Persistent loader workers (``persistent_workers``): one DataLoader whose epochs, resumed or not, yield the same
batches in the same order as a loader built for each epoch, from the same worker processes
(``tests/training/test_loop.py`` runs the trainer's loop with them)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from smog_scale.data.shards import build_train_loader
from tests.helpers import LOADER_CROPS, children, write_shards

EPOCHS = 3


@pytest.fixture()
def urls(tmp_path: Path) -> str:
    """8 shards x 4 samples."""
    return write_shards(tmp_path / "shards", [4] * 8)


def _loader(urls: str, persistent: bool, epoch: int = 0, start_batch: int = 0, resampled: bool = True):
    return build_train_loader(urls, crops=LOADER_CROPS, batch_size=2, num_workers=2, seed=11, epoch=epoch,
                              shuffle_buffer=8, resampled=resampled, start_batch=start_batch,
                              persistent_workers=persistent)


def _epochs(loader, epochs: range, start_batch: int = 0) -> tuple[list[list[str]], list[set[int]], list[list]]:
    """Each epoch's keys, its worker processes (seen after its first batch) and its crops."""
    keys, workers, crops = [], [], []
    before = children()
    try:
        for epoch in epochs:
            loader.set_epoch(epoch, start_batch=start_batch if epoch == epochs[0] else 0)
            batches = iter(loader)
            first = next(batches)
            workers.append(children() - before)
            done = [first, *itertools.islice(batches, len(loader) - loader.start_batch - 1)]
            keys.append([key for batch in done for key in batch["key"]])
            crops.append([batch["crops"] for batch in done])
    finally:
        loader.close()
    return keys, workers, crops


@pytest.mark.parametrize("resampled", [True, False])
def test_persistent_workers_give_each_epoch_the_batches_of_a_loader_built_for_it(urls: str, resampled: bool) -> None:
    persistent, workers, crops = _epochs(_loader(urls, True, resampled=resampled), range(EPOCHS))
    rebuilt, _, rebuilt_crops = _epochs(_loader(urls, False, resampled=resampled), range(EPOCHS))
    # today's path: a loader built for each epoch
    fresh = [[key for batch in _loader(urls, False, epoch, resampled=resampled) for key in batch["key"]]
             for epoch in range(EPOCHS)]
    assert persistent == rebuilt == fresh
    assert len({tuple(keys) for keys in persistent}) == EPOCHS  # the epochs differ
    for ours, theirs in zip(itertools.chain(*crops), itertools.chain(*rebuilt_crops), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert len(workers[0]) == 2


def test_persistent_workers_are_the_same_processes_every_epoch(urls: str) -> None:
    _, persistent, _ = _epochs(_loader(urls, True), range(EPOCHS))
    assert len(persistent[0]) == 2 and all(pids == persistent[0] for pids in persistent)
    _, rebuilt, _ = _epochs(_loader(urls, False), range(EPOCHS))
    assert all(len(pids) == 2 for pids in rebuilt)
    assert not rebuilt[0] & rebuilt[1] and not rebuilt[1] & rebuilt[2]  # new workers every epoch
    before = children()
    loader = _loader(urls, True)
    next(iter(loader))
    assert len(children() - before) == 2
    loader.close()
    assert not children() - before, "close() left a persistent worker"


@pytest.mark.parametrize("epoch, start", [(1, 3), (2, 0), (2, 5)])
def test_a_resumed_loader_replays_the_uninterrupted_run(urls: str, epoch: int, start: int) -> None:
    straight, _, _ = _epochs(_loader(urls, True), range(EPOCHS))
    tail = list(itertools.chain(*straight))[epoch * len(straight[0]) + start * 2:]
    resumed, _, _ = _epochs(_loader(urls, True, epoch, start), range(epoch, EPOCHS), start_batch=start)
    assert list(itertools.chain(*resumed)) == tail
