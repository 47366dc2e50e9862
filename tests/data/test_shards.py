"""The WebDataset pipeline on tiny shards written in tmp_path (open_clip's test style)."""

from __future__ import annotations

import gzip
import itertools
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from smog_scale.data.shards import (
    ShardCheckError,
    build_eval_loader,
    build_train_loader,
    check_shards,
    count_samples,
    cpu_worker_note,
    read_manifest,
    shard_urls,
)
from tests.helpers import LOADER_CROPS, write_shards


@pytest.fixture()
def shards(tmp_path: Path) -> str:
    """8 shards x 4 samples."""
    return write_shards(tmp_path / "shards", [4] * 8)


def _keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


def test_manifest_and_counts(shards: str, tmp_path: Path) -> None:
    assert read_manifest(shards)["num_samples"] == 32
    assert count_samples(shards.replace("000007", "000003")) == 16  # only the selected shards
    with pytest.raises(FileNotFoundError, match=r"no manifest.json at .*elsewhere"):  # no advice of a flag
        read_manifest(str(tmp_path / "elsewhere" / "x-{000000..000001}.tar"))
    with pytest.raises(ValueError, match="only local shards have one"):
        read_manifest("pipe:cat x-{000000..000001}.tar")


def test_batch_layout_and_epoch_length(shards: str) -> None:
    loader = build_train_loader(shards, crops=LOADER_CROPS, batch_size=3, num_workers=2, seed=0)
    assert len(loader) == 32 // 3 // 2 * 2 == loader.num_samples // 3
    batches = list(loader)
    assert len(batches) == len(loader)
    batch = batches[0]
    assert [tuple(c.shape) for c in batch["crops"]] == [(2, 3, 3, 16, 16), (2, 3, 3, 8, 8)]
    assert all(c.dtype == torch.uint8 for c in batch["crops"])
    assert batch["cls"].dtype == torch.long and batch["cls"].shape == (3,)
    assert len(batch["key"]) == 3 and batch["skipped"] == 0


def test_with_epoch_overrides_manifest(shards: str) -> None:
    loader = build_train_loader(shards, crops=LOADER_CROPS, batch_size=2, num_workers=2, seed=0, num_samples=100)
    assert len(loader) == 50 and sum(1 for _ in loader) == 50  # more samples than one pass over the shards


def test_deterministic_for_seed_epoch_rank(shards: str) -> None:
    def run(epoch: int, rank: int) -> list[dict]:
        loader = build_train_loader(shards, crops=LOADER_CROPS, batch_size=4, num_workers=2, seed=7,
                                    epoch=epoch, rank=rank, world_size=2, shuffle_buffer=8)
        return list(loader)

    first, second = run(epoch=1, rank=0), run(epoch=1, rank=0)
    for a, b in zip(first, second, strict=True):
        assert a["key"] == b["key"]
        assert all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"], strict=True))
    assert [b["key"] for b in run(epoch=2, rank=0)] != [b["key"] for b in first]
    assert [b["key"] for b in run(epoch=1, rank=1)] != [b["key"] for b in first]


@pytest.mark.parametrize("workers, start", [(0, 3), (2, 3), (2, 4), (3, 5)])
@pytest.mark.parametrize("resampled", [True, False])
def test_resume_mid_epoch_replays_the_rest_of_the_pass(shards: str, workers: int, start: int, resampled: bool) -> None:
    def loader(start_batch: int):
        return build_train_loader(shards, crops=LOADER_CROPS, batch_size=2, num_workers=workers, seed=5, epoch=1,
                                  shuffle_buffer=8, resampled=resampled, start_batch=start_batch)

    full = list(loader(0))
    resumed = list(itertools.islice(loader(start), len(full) - start))
    assert [b["key"] for b in resumed] == [b["key"] for b in full[start:]]
    for a, b in zip(resumed, full[start:]):
        assert all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"], strict=True))


def test_folder_urls_and_missing_shards(shards: str, tmp_path: Path) -> None:
    folder = str(Path(shard_urls(shards)[0]).parent)
    assert shard_urls(folder) == check_shards(folder) == shard_urls(shards)
    assert count_samples(folder) == count_samples(shards)
    with pytest.raises(ShardCheckError, match=r"2 of 3 shards .* cannot be read: .*x-000001.tar does not exist"):
        check_shards(f"{shard_urls(shards)[0]}::{tmp_path}/x-{{000001..000002}}.tar")


def test_startup_check_lists_empty_and_non_tar_shards(shards: str, tmp_path: Path) -> None:
    """A 0-byte shard, an HTML error page and an empty tar are refused before any work, all named;
    a gzip-compressed tar (which webdataset reads) and remote URLs pass."""
    root = Path(shard_urls(shards)[0]).parent
    (root / "demo-000002.tar").write_bytes(b"")
    (root / "demo-000005.tar").write_bytes(b"<html><body>503 Service Unavailable</body></html>\n" * 20)
    with tarfile.open(root / "demo-000006.tar", "w"):
        pass  # a tar without members: only end-of-archive blocks
    with pytest.raises(ShardCheckError) as info:
        check_shards(str(root))
    message = str(info.value)
    assert "3 of 8 shards" in message and len(message.splitlines()) == 1, message
    assert "demo-000002.tar is empty (0 bytes)" in message
    assert "demo-000005.tar is not a tar file" in message and "demo-000006.tar is not a tar file" in message
    with open(root / "demo-000000.tar", "rb") as src, gzip.open(tmp_path / "packed.tar.gz", "wb") as dst:
        dst.write(src.read())
    assert check_shards(f"{tmp_path}/packed.tar.gz::http://host/x-{{000000..000001}}.tar::pipe:cat x.tar") == [
        f"{tmp_path}/packed.tar.gz", "http://host/x-000000.tar", "http://host/x-000001.tar", "pipe:cat x.tar"]
    loader = build_eval_loader(str(tmp_path / "packed.tar.gz"), image_size=8, batch_size=8, num_workers=0)
    assert sum(len(keys) for _, _, keys in loader) == 4


def test_startup_check_of_1024_shards_is_fast(tmp_path: Path) -> None:
    """One header read per shard, in parallel: 1,024 shards well under a second on an idle disk."""
    data = (Path(write_shards(tmp_path / "one", [1]).replace("{000000..000000}", "000000"))).read_bytes()
    root = tmp_path / "many"
    root.mkdir()
    for index in range(1024):
        (root / f"s-{index:06d}.tar").write_bytes(data)
    start = time.perf_counter()
    assert len(check_shards(f"{root}/s-{{000000..001023}}.tar")) == 1024
    assert time.perf_counter() - start < 10  # generous: a loaded 2-core machine


def test_set_epoch_matches_building_for_that_epoch(shards: str) -> None:
    loader = build_train_loader(shards, crops=LOADER_CROPS, batch_size=4, num_workers=0, seed=3, shuffle_buffer=8)
    loader.set_epoch(5)
    fresh = build_train_loader(shards, crops=LOADER_CROPS, batch_size=4, num_workers=0, seed=3, epoch=5, shuffle_buffer=8)
    assert _keys(loader) == _keys(fresh) == _keys(loader)  # re-iterating replays the epoch


def test_no_resampling_covers_every_sample_once_over_ranks_and_workers(shards: str) -> None:
    seen = Counter()
    for rank in range(2):
        loader = build_train_loader(shards, crops=LOADER_CROPS, batch_size=4, num_workers=2, seed=1,
                                    rank=rank, world_size=2, resampled=False)
        assert len(loader) == 4
        seen.update(_keys(loader))
    assert len(seen) == 32 and set(seen.values()) == {1}


def test_eval_loader_covers_every_sample_once(tmp_path: Path) -> None:
    urls = write_shards(tmp_path / "val", [3, 5, 2, 4, 1])
    seen = Counter()
    for rank in range(2):
        for images, labels, keys in build_eval_loader(urls, image_size=16, batch_size=4, num_workers=2,
                                                      rank=rank, world_size=2):
            assert images.dtype == torch.float32 and images.shape[1:] == (3, 16, 16)
            assert labels.dtype == torch.long and len(keys) == len(labels) == len(images)
            seen.update(keys)
    assert len(seen) == 15 and set(seen.values()) == {1}


def test_fail_fast_when_shards_cannot_feed_every_worker(shards: str) -> None:
    with pytest.raises(ValueError, match="8 shards cannot feed 3 workers x 4 ranks"):
        build_train_loader(shards, crops=LOADER_CROPS, batch_size=1, num_workers=3, seed=0, world_size=4, resampled=False)


def test_pipe_urls_and_multiple_patterns(tmp_path: Path) -> None:
    first = write_shards(tmp_path / "a", [2, 2])
    second = write_shards(tmp_path / "b", [3])
    urls = f"pipe:cat {first}::{second}"
    loader = build_eval_loader(urls, image_size=8, batch_size=5, num_workers=0)
    assert sum(len(keys) for _, _, keys in loader) == 7


@pytest.mark.parametrize("workers, rank, world", [(0, 0, 1), (2, 0, 1), (3, 1, 2), (2, 0, 3)])
def test_eval_loader_length_is_the_batches_it_yields(tmp_path: Path, workers: int, rank: int, world: int) -> None:
    urls = write_shards(tmp_path / "len", [3, 5, 2, 4, 1, 6])
    loader = build_eval_loader(urls, image_size=8, batch_size=2, num_workers=workers, rank=rank, world_size=world)
    assert len(loader) == sum(1 for _ in loader)
    with pytest.raises(TypeError, match="no manifest"):
        len(build_eval_loader(f"pipe:cat {shard_urls(urls)[0]}", image_size=8, batch_size=2, num_workers=0))


def test_cpu_worker_note_only_where_workers_would_take_the_compute_threads_cores(monkeypatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(4)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cpu = torch.device("cpu")
    assert cpu_worker_note(2, cpu) is None  # 4 cores: 2 compute threads, 2 spare
    assert "data.num_workers=2" in (cpu_worker_note(3, cpu) or "")
    assert cpu_worker_note(8, torch.device("cuda")) is None  # the GPU computes: workers as the recipe says
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 2 cores per process, both computing
    assert "data.num_workers=0" in (cpu_worker_note(1, cpu) or "")
    assert cpu_worker_note(0, cpu) is None
