"""Reading shards inside the loader workers: bounded retries, a board of what each reads, a failure guard.

Opening with bounded retries, a board that shows which shard each worker is reading (so a stalled read
can be named from the main process), and a guard that counts skipped samples and stops a stream in which
nothing decodes.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from multiprocessing.sharedctypes import RawArray
from typing import IO, Any
from urllib.parse import urlparse

import torch
import webdataset as wds
from webdataset.gopen import Pipe

from smog_scale.data.shard_list import ShardError

_log = logging.getLogger(__name__)
_URL_BYTES = 1024  # per worker on the board; longer URLs are cut
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # pre-emption: the trainer's to handle, never a loader worker's


class ShardOpenError(ShardError):
    """A shard URL could not be opened after the bounded retries; the message names the URL."""


class ShardStallError(ShardError):
    """No batch arrived within the read timeout; the message names the shard a worker is stuck on."""


class SampleFailures(ShardError):
    """Too many samples in a row failed; the message names the first one's shard, key and error."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line. A loader worker's error reaches the main process as the
    worker's whole traceback, whose last line is ``module.Type: message``; keep the message."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    return lines[-1].removeprefix(prefix)


class ReadBoard:
    """What each loader worker is reading, in shared memory the main process can inspect.

    Created in the main process before the DataLoader starts its workers (``init_worker`` is the
    ``worker_init_fn``). A worker marks the URL and the time a read starts and clears the time when
    it returns, so a worker blocked in a read (a stalled ``pipe:`` command, a hung network
    filesystem) shows its URL and how long it has waited. With no worker processes it is inert.
    """

    def __init__(self, num_workers: int) -> None:
        slots = max(1, num_workers)
        self._pids = RawArray("q", slots)
        self._since = RawArray("d", slots)  # time.monotonic() when the current read started; 0: not reading
        self._urls = RawArray("c", slots * _URL_BYTES)

    def init_worker(self, worker: int) -> None:
        """``worker_init_fn``: record the pid; ignore SIGTERM/SIGUSR1, since a cluster signals the whole
        process group at pre-emption and the trainer, not its loader workers, decides when to stop.

        The worker starts with them blocked (``ShardLoader``): one that arrived since the fork is pending,
        and is dropped once ignored here, instead of ending the worker in torch's SIGTERM handler.
        """
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        self._pids[worker] = os.getpid()

    def reading(self, url: str) -> Callable[[], None]:
        """Mark this worker as reading ``url`` from now; call the returned function when the read returns."""
        info = torch.utils.data.get_worker_info()
        if info is None:
            return _nothing
        worker = info.id
        start = worker * _URL_BYTES
        data = url.encode()[: _URL_BYTES - 1]
        self._urls[start:start + len(data) + 1] = data + b"\0"
        self._since[worker] = time.monotonic()

        def done() -> None:
            self._since[worker] = 0.0

        return done

    def describe_stall(self) -> str:
        """The worker that has waited longest in a read, with its URL; or every worker's last URL."""
        now, waiting = time.monotonic(), []
        for worker, since in enumerate(self._since):
            url = self._urls[worker * _URL_BYTES:(worker + 1) * _URL_BYTES].split(b"\0", 1)[0].decode(errors="replace")
            waiting.append((since or now, worker, url))
        since, worker, url = min(waiting)
        if since < now:
            return f"loader worker {worker} has been reading shard {url!r} for {now - since:.0f} s"
        urls = ", ".join(repr(u) for *_, u in waiting if u) or "none yet"
        return f"no loader worker is inside a read (last shards: {urls})"

    def kill_workers(self) -> None:
        """SIGKILL this loader's workers and reap them: a worker blocked in a read never sees the
        DataLoader's shutdown, and it ignores SIGTERM (``init_worker``)."""
        pids = {pid for pid in self._pids if pid}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in multiprocessing.active_children():
            if process.pid in pids:
                process.join(timeout=10)


def _nothing() -> None:
    pass


class _WatchedStream:
    """A shard stream whose reads are marked on the board; ``str`` is the URL (webdataset puts the
    stream into its error messages)."""

    def __init__(self, url: str, stream: IO[bytes], board: ReadBoard, head: bytes = b"") -> None:
        self.url, self._stream, self._board, self._head = url, stream, board, head

    def read(self, size: int = -1) -> bytes:
        if 0 <= size <= len(self._head):
            data, self._head = self._head[:size], self._head[size:]
            return data
        data, self._head = self._head, b""
        done = self._board.reading(self.url)
        try:
            return data + self._stream.read(size - len(data) if size >= 0 else -1)
        finally:
            done()

    def close(self) -> None:
        self._stream.close()

    def __str__(self) -> str:
        return self.url


def _gopen(url: str, stall_timeout_s: float) -> IO[bytes]:
    """``wds.gopen``, except http(s): webdataset's curl has no stall timeout (a server that stops
    sending hangs the reader forever) and retries up to 30 times itself, so our curl aborts after
    ``stall_timeout_s`` without a connection or a byte, and ``open_shard`` owns the retries."""
    if urlparse(url).scheme not in ("http", "https"):
        return wds.gopen(url)
    seconds = str(max(1, round(stall_timeout_s)))
    return Pipe(["curl", "--connect-timeout", seconds, "--speed-limit", "1", "--speed-time", seconds,
                 "-f", "-s", "-L", url], mode="rb", bufsize=8192, ignore_status=[141, 23])


def open_shard(url: str, attempts: int, delay_s: float, stall_timeout_s: float, board: ReadBoard) -> _WatchedStream:
    """Open ``url`` (``_gopen``); pipe:/curl failures only show on read, so read a block."""
    error: Exception | None = None
    for attempt in range(1, attempts + 1):
        done = board.reading(url)  # opening a file on a hung filesystem blocks too
        try:
            stream = _gopen(url, stall_timeout_s)
            head = stream.read(512)
            if not head:
                stream.close()  # a failed command raises its exit status here
                raise OSError("the stream is empty")
            return _WatchedStream(url, stream, board, head)
        except Exception as exn:  # noqa: BLE001 - any failure to open is retried, then reported
            error = exn
            _log.warning("opening %s failed (attempt %d/%d): %r", url, attempt, attempts, exn)
            if attempt < attempts:
                time.sleep(delay_s * attempt)
        finally:
            done()
    raise ShardOpenError(f"cannot open shard {url!r} after {attempts} attempts: {error!r}") from error


class FailureGuard:
    """Counts the samples and shard errors a worker skips, and stops after ``limit`` in a row.

    Used as the webdataset exception handler of the tar stages (shard-level errors: the shard being
    read is the one named) and through ``failed``/``succeeded`` around decoding (sample-level errors:
    the sample's own shard and key). A stream where nothing decodes (every crop fails, HTML instead of
    tar, images under a key the pipeline does not read) raises ``SampleFailures`` instead of skipping
    forever.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_consecutive_failures must be at least 1, got {limit}")
        self.limit, self.count, self.in_a_row = limit, 0, 0
        self.shard = ""  # the shard the tar stages are reading
        self.first = ""  # the first failure of the current run of failures

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, SampleFailures):  # ours, passing through webdataset's handlers: stop
            raise exn
        self.failed(self.shard, None, exn)
        return True

    def failed(self, shard: str, key: str | None, exn: Exception) -> None:
        self.count += 1
        self.in_a_row += 1
        error = repr(exn)[:500]
        _log.warning("skipping a sample or shard after %s", error)
        if self.in_a_row == 1:
            self.first = f"shard {shard!r}" + (f", sample {key!r}" if key is not None else "") + f": {error}"
        if self.in_a_row >= self.limit:
            raise SampleFailures(f"{self.in_a_row} samples or shards in a row failed "
                                 f"(max_consecutive_failures={self.limit}); the first: {self.first}")

    def succeeded(self) -> None:
        self.in_a_row = 0

    def take(self) -> int:
        """Return the count since the previous call and reset it."""
        count, self.count = self.count, 0
        return count

    def open_shards(self, src: Iterator[dict], attempts: int, delay_s: float, stall_timeout_s: float,
                    board: ReadBoard) -> Iterator[dict]:
        """``wds.url_opener`` with bounded retries (it neither retries nor sees lazy pipe failures);
        remembers the shard being read for the errors of the tar stages."""
        for sample in src:
            self.shard = sample["url"]
            yield dict(sample, stream=open_shard(sample["url"], attempts, delay_s, stall_timeout_s, board))

    def decode(self, src: Iterator[dict], fn: Callable[[dict], Any]) -> Iterator[Any]:
        """``fn`` over the samples; a sample it fails on is skipped and counted."""
        for sample in src:
            try:
                out = fn(sample)
            except Exception as exn:  # noqa: BLE001 - a bad sample, whatever the decoder raises
                self.failed(sample.get("__url__", self.shard), sample.get("__key__"), exn)
                continue
            self.succeeded()
            yield out
