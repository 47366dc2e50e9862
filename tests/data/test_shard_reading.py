"""Reading shards in the loader workers: corrupt samples and shards skipped and counted, bounded retries, a
stream where nothing decodes, a stalled read, and workers that never die of a pre-emption signal."""

from __future__ import annotations

import gc
import os
import signal
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds
from torch.utils.data._utils import signal_handling

from smog_scale.data.shards import (
    SampleFailures,
    ShardOpenError,
    ShardStallError,
    build_eval_loader,
    build_train_loader,
)
from tests.helpers import LOADER_CROPS, children, deadline, write_shards


def test_corrupt_sample_is_skipped_and_counted(tmp_path: Path) -> None:
    urls = write_shards(tmp_path / "bad", [4, 4], bad=frozenset({"s01_002"}))
    loader = build_train_loader(urls, crops=LOADER_CROPS, batch_size=7, num_workers=0, seed=0, num_samples=7,
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
    loader = build_train_loader(urls, crops=LOADER_CROPS, batch_size=1, num_workers=0, seed=0, num_samples=6,
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
    loader = build_train_loader(url, crops=LOADER_CROPS, batch_size=1, num_workers=0, seed=0, num_samples=1,
                                open_attempts=3, retry_delay_s=0.0)
    error = _error_of(loader)
    assert error.startswith(ShardOpenError.__name__) and url in error and "after 3 attempts" in error
    assert attempts.read_text().count("try") == 3


def test_missing_shard_is_named_from_a_worker(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", [4] * 8)
    missing = str(tmp_path / "gone-000000.tar")
    loader = build_train_loader(f"{shards}::{missing}", crops=LOADER_CROPS, batch_size=1, num_workers=2, seed=0,
                                num_samples=40, resampled=False, open_attempts=2, retry_delay_s=0.0)
    error = _error_of(loader)
    assert ShardOpenError.__name__ in error and missing in error and "after 2 attempts" in error


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
    loader = build_train_loader(urls, crops=LOADER_CROPS, batch_size=2, num_workers=workers, seed=0, num_samples=64,
                                max_consecutive_failures=6)
    before = children()
    with deadline(60), pytest.raises(SampleFailures) as info:
        next(iter(loader))
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message  # not the worker's traceback
    assert message.startswith("6 samples or shards in a row failed (max_consecutive_failures=6); the first: shard ")
    assert f"{tmp_path}/png/png-00000" in message and ", sample 'p" in message and "KeyError('jpg')" in message
    # The workers are gone with the error, not when a garbage collection finds the iterator: they ignore
    # SIGTERM, so multiprocessing would wait for them forever at exit.
    assert not children() - before


def test_shards_of_html_stop_naming_the_shard(tmp_path: Path) -> None:
    """Not a tar at all (an error page saved as a shard): every shard fails; the eval loader stops too."""
    root = tmp_path / "html"
    root.mkdir()
    for index in range(3):
        (root / f"h-{index:06d}.tar").write_bytes(b"<html>404 Not Found</html>\n" * 40)
    urls = f"{root}/h-{{000000..000002}}.tar"
    train = build_train_loader(urls, crops=LOADER_CROPS, batch_size=2, num_workers=0, seed=0, num_samples=8,
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


@pytest.mark.parametrize("kind", ["train", "persistent", "eval"])
def test_a_stalled_read_ends_with_the_shard_named_and_the_workers_gone(tmp_path: Path, kind: str) -> None:
    """A ``pipe:`` command that never sends (or a hung network filesystem): no batch within
    ``read_timeout_s`` raises naming the shard, and the stuck worker (which ignores SIGTERM) is killed,
    persistent or not."""
    stalled = "pipe:exec sleep 20"
    urls = f"{stalled}::{write_shards(tmp_path / 'shards', [4] * 8)}"
    if kind in ("train", "persistent"):
        loader = build_train_loader(urls, crops=LOADER_CROPS, batch_size=2, num_workers=1, seed=0, num_samples=8,
                                    resampled=False, read_timeout_s=2, persistent_workers=kind == "persistent")
    else:
        loader = build_eval_loader(urls, image_size=8, batch_size=2, num_workers=1, read_timeout_s=2)
    before = children()
    start = time.monotonic()
    with deadline(60), pytest.raises(ShardStallError) as info:
        list(loader)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert message.startswith("no batch for 2 s (read_timeout_s): loader worker 0 has been reading shard "
                              f"'{stalled}' for "), message
    assert not children() - before, "a loader worker survived"


@pytest.mark.parametrize("kind", ["train", "persistent", "eval"])
def test_workers_ignore_preemption_signals(tmp_path: Path, kind: str) -> None:
    """SIGTERM/SIGUSR1 to the process group (a cluster's pre-emption) must not kill the loader workers:
    the trainer saves a checkpoint first, and the kNN monitor may be running at that moment."""
    urls = write_shards(tmp_path / "sig", [4] * 4)
    if kind in ("train", "persistent"):
        loader = build_train_loader(urls, crops=LOADER_CROPS, batch_size=2, num_workers=2, seed=0, resampled=False,
                                    persistent_workers=kind == "persistent")
    else:
        loader = build_eval_loader(urls, image_size=8, batch_size=2, num_workers=2)
    before = children()
    batches = iter(loader)
    # One batch from each worker (the DataLoader takes them in turn): both have run their init, which is where
    # they start ignoring the signals (a signal before that: the next test).
    keys = [k for _ in range(2) for k in next(batches)[-1 if kind == "eval" else "key"]]
    workers = children() - before
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker, signal.SIGTERM)
        os.kill(worker, signal.SIGUSR1)
    time.sleep(0.5)
    keys += [k for batch in batches for k in (batch[-1] if kind == "eval" else batch["key"])]
    assert len(keys) == 16 and len(set(keys)) == 16
    if kind == "persistent":  # the same workers serve the next pass
        assert len([k for batch in loader for k in batch["key"]]) == 16 and children() - before == workers
        loader.close()


def test_a_preemption_signal_while_a_worker_starts_does_not_end_it(tmp_path: Path, monkeypatch) -> None:
    """Each worker gets SIGTERM and SIGUSR1 right after torch installed its worker signal handlers, before its
    ``worker_init_fn`` ignores them (a pre-emption at an epoch's start): the worker lives and the pass completes."""
    install = signal_handling._set_worker_signal_handlers

    def install_then_signal(*args) -> None:
        install(*args)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(signal_handling, "_set_worker_signal_handlers", install_then_signal)  # forked workers see it
    loader = build_train_loader(write_shards(tmp_path / "sig", [4] * 4), crops=LOADER_CROPS, batch_size=2, num_workers=2,
                                seed=0, resampled=False)
    with deadline(60):
        keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == 16 and len(set(keys)) == 16
