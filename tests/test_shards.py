"""The WebDataset pipeline on tiny shards written in tmp_path (open_clip's test style)."""

from __future__ import annotations

import contextlib
import gc
import gzip
import io
import itertools
import json
import os
import signal
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data._utils import signal_handling

from smog_scale.data.multicrop import CropSpec
from smog_scale.data.shards import (
    SampleFailures,
    ShardCheckError,
    ShardOpenError,
    ShardStallError,
    build_eval_loader,
    build_train_loader,
    check_shards,
    count_samples,
    read_manifest,
    shard_urls,
)

CROPS = (
    CropSpec(size=16),
    CropSpec(size=16, blur_p=0.1, solarize_p=0.2),
    CropSpec(size=8, count=2, scale=(0.05, 0.14), blur_p=0.5),
)


def _jpeg(rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=85)
    return out.getvalue()


def write_shards(root: Path, sizes: list[int], bad: frozenset[str] = frozenset()) -> str:
    """Write ``len(sizes)`` shards ``demo-00000i.tar`` plus a manifest; keys in ``bad`` get junk bytes.

    Returns the brace pattern over the shards.
    """
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for shard, size in enumerate(sizes):
        name = f"demo-{shard:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for index in range(size):
                key = f"s{shard:02d}_{index:03d}"
                image = b"not a jpeg" if key in bad else _jpeg(rng)
                sink.write({"__key__": key, "jpg": image, "cls": shard % 3})
        entries.append({"name": name, "samples": size})
    manifest = {"format": 1, "tool_version": "test", "shards": entries, "num_samples": sum(sizes),
                "classes": ["a", "b", "c"], "options": {}, "skipped": 0, "report": ""}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root / f"demo-{{000000..{len(sizes) - 1:06d}}}.tar")


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
    loader = build_train_loader(shards, crops=CROPS, batch_size=3, num_workers=2, seed=0)
    assert len(loader) == 32 // 3 // 2 * 2 == loader.num_samples // 3
    batches = list(loader)
    assert len(batches) == len(loader)
    batch = batches[0]
    assert [tuple(c.shape) for c in batch["crops"]] == [(2, 3, 3, 16, 16), (2, 3, 3, 8, 8)]
    assert all(c.dtype == torch.uint8 for c in batch["crops"])
    assert batch["cls"].dtype == torch.long and batch["cls"].shape == (3,)
    assert len(batch["key"]) == 3 and batch["skipped"] == 0


def test_with_epoch_overrides_manifest(shards: str) -> None:
    loader = build_train_loader(shards, crops=CROPS, batch_size=2, num_workers=2, seed=0, num_samples=100)
    assert len(loader) == 50 and sum(1 for _ in loader) == 50  # more samples than one pass over the shards


def test_deterministic_for_seed_epoch_rank(shards: str) -> None:
    def run(epoch: int, rank: int) -> list[dict]:
        loader = build_train_loader(shards, crops=CROPS, batch_size=4, num_workers=2, seed=7,
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
        return build_train_loader(shards, crops=CROPS, batch_size=2, num_workers=workers, seed=5, epoch=1,
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
    loader = build_train_loader(shards, crops=CROPS, batch_size=4, num_workers=0, seed=3, shuffle_buffer=8)
    loader.set_epoch(5)
    fresh = build_train_loader(shards, crops=CROPS, batch_size=4, num_workers=0, seed=3, epoch=5, shuffle_buffer=8)
    assert _keys(loader) == _keys(fresh) == _keys(loader)  # re-iterating replays the epoch


def test_no_resampling_covers_every_sample_once_over_ranks_and_workers(shards: str) -> None:
    seen = Counter()
    for rank in range(2):
        loader = build_train_loader(shards, crops=CROPS, batch_size=4, num_workers=2, seed=1,
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
        build_train_loader(shards, crops=CROPS, batch_size=1, num_workers=3, seed=0, world_size=4, resampled=False)


def test_corrupt_sample_is_skipped_and_counted(tmp_path: Path) -> None:
    urls = write_shards(tmp_path / "bad", [4, 4], bad=frozenset({"s01_002"}))
    loader = build_train_loader(urls, crops=CROPS, batch_size=7, num_workers=0, seed=0, num_samples=7,
                                resampled=False)
    (batch,) = list(loader)
    assert "s01_002" not in batch["key"] and len(batch["key"]) == 7
    assert batch["skipped"] == 1


def test_truncated_and_unreadable_shards_are_skipped_and_counted(tmp_path: Path) -> None:
    urls = write_shards(tmp_path / "trunc", [4, 4, 4])
    root = tmp_path / "trunc"
    with tarfile.open(root / "demo-000001.tar") as tar:
        cut = next(m for m in tar.getmembers() if m.name == "s01_002.jpg").offset_data + 10
    os.truncate(root / "demo-000001.tar", cut)
    (root / "demo-000002.tar").write_bytes(b"\x01" * 2048)  # not a tar at all
    loader = build_train_loader(urls, crops=CROPS, batch_size=1, num_workers=0, seed=0, num_samples=6,
                                resampled=False)
    batches = list(loader)
    keys = [key for batch in batches for key in batch["key"]]
    assert sorted(keys) == ["s00_000", "s00_001", "s00_002", "s00_003", "s01_000", "s01_001"]
    assert sum(batch["skipped"] for batch in batches) >= 2


def _error_of(loader) -> str:
    """Iterate ``loader`` until it raises; return "Type: message" after releasing its workers."""
    try:
        for _ in loader:
            pass
    except Exception as exn:  # noqa: BLE001
        error = f"{type(exn).__name__}: {exn}"
    else:
        return ""
    gc.collect()  # DataLoader's re-raised error is in a frame cycle that holds the worker iterator
    return error


def test_unopenable_url_is_retried_then_named(tmp_path: Path) -> None:
    attempts = tmp_path / "attempts"
    url = f"pipe:echo try >> {attempts}; exit 3"
    loader = build_train_loader(url, crops=CROPS, batch_size=1, num_workers=0, seed=0, num_samples=1,
                                open_attempts=3, retry_delay_s=0.0)
    error = _error_of(loader)
    assert error.startswith(ShardOpenError.__name__) and url in error and "after 3 attempts" in error
    assert attempts.read_text().count("try") == 3


def test_missing_shard_is_named_from_a_worker(shards: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "gone-000000.tar")
    loader = build_train_loader(f"{shards}::{missing}", crops=CROPS, batch_size=1, num_workers=2, seed=0,
                                num_samples=40, resampled=False, open_attempts=2, retry_delay_s=0.0)
    error = _error_of(loader)
    assert ShardOpenError.__name__ in error and missing in error and "after 2 attempts" in error


def test_pipe_urls_and_multiple_patterns(tmp_path: Path) -> None:
    first = write_shards(tmp_path / "a", [2, 2])
    second = write_shards(tmp_path / "b", [3])
    urls = f"pipe:cat {first}::{second}"
    loader = build_eval_loader(urls, image_size=8, batch_size=5, num_workers=0)
    assert sum(len(keys) for _, _, keys in loader) == 7


class Expired(BaseException):
    """Not an Exception: the loader's skip handlers must not swallow it."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: today's loader skips failing samples forever."""
    def expire(*_):
        raise Expired(f"no result within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _children() -> set[int]:
    """This process's live children (zombies left by killed workers do not count)."""
    return {c.pid for c in psutil.Process().children() if c.status() != psutil.STATUS_ZOMBIE}


def _png_shards(root: Path, count: int) -> str:
    """Shards whose images sit under ``png``, a key the pipeline does not read."""
    root.mkdir()
    for shard in range(count):
        with wds.TarWriter(str(root / f"png-{shard:06d}.tar")) as sink:
            for index in range(4):
                sink.write({"__key__": f"p{shard}_{index}", "png": b"\x89PNG not read", "cls": 0})
    return str(root / f"png-{{000000..{count - 1:06d}}}.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_where_nothing_decodes_stops_naming_shard_key_and_error(tmp_path: Path, workers: int) -> None:
    urls = _png_shards(tmp_path / "png", 2)
    loader = build_train_loader(urls, crops=CROPS, batch_size=2, num_workers=workers, seed=0, num_samples=64,
                                max_consecutive_failures=6)
    before = _children()
    with deadline(60), pytest.raises(SampleFailures) as info:
        next(iter(loader))
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message  # not the worker's traceback
    assert message.startswith("6 samples or shards in a row failed (max_consecutive_failures=6); the first: shard ")
    assert f"{tmp_path}/png/png-00000" in message and ", sample 'p" in message and "KeyError('jpg')" in message
    # The workers are gone with the error, not when a garbage collection finds the iterator: they ignore
    # SIGTERM, so multiprocessing would wait for them forever at exit.
    assert not _children() - before


def test_shards_of_html_stop_naming_the_shard(tmp_path: Path) -> None:
    """Not a tar at all (an error page saved as a shard): every shard fails; the eval loader stops too."""
    root = tmp_path / "html"
    root.mkdir()
    for index in range(3):
        (root / f"h-{index:06d}.tar").write_bytes(b"<html>404 Not Found</html>\n" * 40)
    urls = f"{root}/h-{{000000..000002}}.tar"
    train = build_train_loader(urls, crops=CROPS, batch_size=2, num_workers=0, seed=0, num_samples=8,
                               max_consecutive_failures=5)
    with deadline(60), pytest.raises(SampleFailures, match=rf"5 samples or shards in a row .* shard '{root}/h-"):
        next(iter(train))
    evaluation = build_eval_loader(urls, image_size=8, batch_size=2, num_workers=0, max_consecutive_failures=2)
    with pytest.raises(SampleFailures, match=r"the first: shard '.*h-000000.tar': ReadError"):
        list(evaluation)


def test_failures_count_in_a_row_only(tmp_path: Path) -> None:
    """Every other sample corrupt (the evaluation loader keeps their order): never two in a row, so a
    limit of 2 never stops the pass; two in a row do."""
    bad = frozenset(f"s{s:02d}_{i:03d}" for s in range(2) for i in range(0, 6, 2))
    urls = write_shards(tmp_path / "half", [6, 6], bad=bad)
    loader = build_eval_loader(urls, image_size=8, batch_size=4, num_workers=0, max_consecutive_failures=2)
    keys = [key for *_, batch_keys in loader for key in batch_keys]
    assert sorted(keys) == sorted({f"s{s:02d}_{i:03d}" for s in range(2) for i in range(6)} - bad)
    urls = write_shards(tmp_path / "pair", [6], bad=frozenset({"s00_002", "s00_003"}))
    with pytest.raises(SampleFailures, match="2 samples or shards in a row failed .* sample 's00_002'"):
        list(build_eval_loader(urls, image_size=8, batch_size=4, num_workers=0, max_consecutive_failures=2))


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_a_stalled_read_ends_with_the_shard_named_and_the_workers_gone(shards: str, kind: str) -> None:
    """A ``pipe:`` command that never sends (or a hung network filesystem): no batch within
    ``read_timeout_s`` raises naming the shard, and the stuck worker (which ignores SIGTERM) is killed."""
    stalled = "pipe:exec sleep 20"
    urls = f"{stalled}::{shards}"
    if kind == "train":
        loader = build_train_loader(urls, crops=CROPS, batch_size=2, num_workers=1, seed=0, num_samples=8,
                                    resampled=False, read_timeout_s=2)
    else:
        loader = build_eval_loader(urls, image_size=8, batch_size=2, num_workers=1, read_timeout_s=2)
    before = _children()
    start = time.monotonic()
    with deadline(60), pytest.raises(ShardStallError) as info:
        list(loader)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert message.startswith("no batch for 2 s (read_timeout_s): loader worker 0 has been reading shard "
                              f"'{stalled}' for "), message
    assert not _children() - before, "a loader worker survived"


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_workers_ignore_preemption_signals(tmp_path: Path, kind: str) -> None:
    """SIGTERM/SIGUSR1 to the process group (a cluster's pre-emption) must not kill the loader workers:
    the trainer saves a checkpoint first, and the kNN monitor may be running at that moment."""
    urls = write_shards(tmp_path / "sig", [4] * 4)
    if kind == "train":
        loader = build_train_loader(urls, crops=CROPS, batch_size=2, num_workers=2, seed=0, resampled=False)
    else:
        loader = build_eval_loader(urls, image_size=8, batch_size=2, num_workers=2)
    before = _children()
    batches = iter(loader)
    # One batch from each worker (the DataLoader takes them in turn): both have run their init, which is where
    # they start ignoring the signals (a signal before that: the next test).
    keys = [k for _ in range(2) for k in next(batches)[-1 if kind == "eval" else "key"]]
    workers = _children() - before
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker, signal.SIGTERM)
        os.kill(worker, signal.SIGUSR1)
    time.sleep(0.5)
    keys += [k for batch in batches for k in (batch[-1] if kind == "eval" else batch["key"])]
    assert len(keys) == 16 and len(set(keys)) == 16


def test_a_preemption_signal_while_a_worker_starts_does_not_end_it(tmp_path: Path, monkeypatch) -> None:
    """Each worker gets SIGTERM and SIGUSR1 right after torch installed its worker signal handlers, before its
    ``worker_init_fn`` ignores them (a pre-emption at an epoch's start): the worker lives and the pass completes."""
    install = signal_handling._set_worker_signal_handlers

    def install_then_signal(*args) -> None:
        install(*args)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(signal_handling, "_set_worker_signal_handlers", install_then_signal)  # forked workers see it
    loader = build_train_loader(write_shards(tmp_path / "sig", [4] * 4), crops=CROPS, batch_size=2, num_workers=2,
                                seed=0, resampled=False)
    with deadline(60):
        keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == 16 and len(set(keys)) == 16


@pytest.mark.parametrize("workers, rank, world", [(0, 0, 1), (2, 0, 1), (3, 1, 2), (2, 0, 3)])
def test_eval_loader_length_is_the_batches_it_yields(tmp_path: Path, workers: int, rank: int, world: int) -> None:
    urls = write_shards(tmp_path / "len", [3, 5, 2, 4, 1, 6])
    loader = build_eval_loader(urls, image_size=8, batch_size=2, num_workers=workers, rank=rank, world_size=world)
    assert len(loader) == sum(1 for _ in loader)
    with pytest.raises(TypeError, match="no manifest"):
        len(build_eval_loader(f"pipe:cat {shard_urls(urls)[0]}", image_size=8, batch_size=2, num_workers=0))
