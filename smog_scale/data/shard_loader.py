"""The loaders' DataLoader: each pass's epoch shared with the workers, persistent workers, errors on one line.

``ShardLoader`` turns a pipeline factory ``build(epoch, start_batch, board)`` into an iterable of batches.
The epoch and start batch of the next pass live in shared memory (``_PassChoice``), set in the main process
before each ``iter`` and read by each worker when it starts that pass, so that persistent workers (one
DataLoader for the run, its workers started once) build every pass from the same (epoch, start batch) as a
DataLoader built for that pass alone: the batches and their order are the same either way.

Any error ends the pass with the workers shut down (and, for a stall, killed): a later ``iter`` starts new
ones. ``close`` shuts persistent workers down; call it when done (they ignore SIGTERM, so a process that
exits with them alive waits for them in multiprocessing's exit handler).
"""

from __future__ import annotations

import signal
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.sharedctypes import RawArray
from typing import Any

import torch

from smog_scale.data.shard_list import ShardError
from smog_scale.data.shard_reading import STOP_SIGNALS, ReadBoard, ShardStallError, one_line

Build = Callable[[int, int, ReadBoard], torch.utils.data.IterableDataset]


class _PassChoice:
    """The (epoch, start batch) of the next pass, in memory shared with the loader workers (created before them)."""

    def __init__(self, epoch: int, start_batch: int) -> None:
        self._values = RawArray("q", [epoch, start_batch])

    def set(self, epoch: int, start_batch: int) -> None:
        self._values[0], self._values[1] = epoch, start_batch

    def get(self) -> tuple[int, int]:
        return int(self._values[0]), int(self._values[1])


class _Passes(torch.utils.data.IterableDataset):
    """The DataLoader's dataset: each ``iter`` (a worker starting a pass) builds the pass the main process chose."""

    def __init__(self, build: Build, choice: _PassChoice, board: ReadBoard) -> None:
        self.build, self.choice, self.board = build, choice, board

    def __iter__(self) -> Iterator[Any]:
        # A generator: the choice is read at the pass's first fetch, after the main process set it and asked
        # for the pass; the previous pass's pipeline (and its shuffle buffer) is gone by then.
        epoch, start_batch = self.choice.get()
        yield from self.build(epoch, start_batch, self.board)


class ShardLoader:
    """An iterable of batches: each ``iter`` is a pass over the pipeline ``build`` makes for the selected
    epoch and start batch; a worker's error reaches the caller as the same error on one line.

    Without ``persistent_workers`` each pass runs in a fresh DataLoader (workers never carry state across
    passes); with it (and workers), one DataLoader serves every pass and its workers build each pass anew,
    so the batches are the same. ``len()`` is the number of batches a pass yields (the evaluation loader
    knows it only from the manifests; without them ``len()`` raises ``TypeError``, which progress bars take
    as unknown).
    """

    def __init__(self, build: Build, *, epoch: int, num_batches: int | None, num_workers: int, pin_memory: bool,
                 read_timeout_s: float, start_batch: int = 0, persistent_workers: bool = False) -> None:
        self._build, self.num_batches = build, num_batches
        self.num_workers, self.pin_memory, self.read_timeout_s = num_workers, pin_memory, read_timeout_s
        self.persistent_workers = persistent_workers and num_workers > 0
        self._choice = _PassChoice(epoch, start_batch)
        self._board = ReadBoard(num_workers)
        self._loader: torch.utils.data.DataLoader | None = None
        self._batches: Iterator[Any] | None = None  # the DataLoader's iterator: its workers

    @property
    def epoch(self) -> int:
        return self._choice.get()[0]

    @property
    def start_batch(self) -> int:
        return self._choice.get()[1]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose shard/sample/augmentation streams the next ``iter`` yields, from batch
        ``start_batch`` on (the resumed pass of ``build_train_loader``)."""
        if min(epoch, start_batch) < 0:
            raise ValueError(f"need epoch, start_batch >= 0; got {epoch=}, {start_batch=}")
        self._choice.set(epoch, start_batch)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("the number of batches is unknown: the shards have no manifest")
        return self.num_batches

    def __iter__(self) -> Iterator[Any]:
        error: BaseException | None = None
        try:
            batches = self._start()
        except Exception as err:  # noqa: BLE001 - raised below, once the workers are shut down
            error = self._fail(err)
        while error is None:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as err:  # noqa: BLE001 - raised below, once the workers are shut down
                error = self._fail(err)
                break
            yield batch
        raise error

    def close(self) -> None:
        """Shut the workers down (they exit; a later ``iter`` starts new ones)."""
        batches, self._batches, self._loader = self._batches, None, None
        shutdown = getattr(batches, "_shutdown_workers", None)  # absent without worker processes
        if shutdown is not None:
            shutdown()

    def _start(self) -> Iterator[Any]:
        """The DataLoader iterator of the next pass: the persistent workers' (which then start the pass), or a
        new DataLoader's with new workers."""
        if self.persistent_workers and self._loader is not None:
            return iter(self._loader)
        self.close()  # a previous pass's workers, if it was left unfinished
        self._board = ReadBoard(self.num_workers)
        self._loader = torch.utils.data.DataLoader(
            _Passes(self._build, self._choice, self._board), batch_size=None, shuffle=False,
            num_workers=self.num_workers, pin_memory=self.pin_memory, worker_init_fn=self._board.init_worker,
            timeout=self.read_timeout_s if self.num_workers > 0 else 0, persistent_workers=self.persistent_workers,
        )
        # The workers start here with the stop signals blocked (a blocked signal waits in this process, for
        # its handler): before ``init_worker`` ignores them, torch's SIGTERM handler would end a worker.
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self._batches = iter(self._loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
        return self._batches

    def _fail(self, err: Exception) -> BaseException:
        """Shut the workers down (kill them after a stall: one stuck in a read never sees the shutdown) and
        return what the pass raises."""
        board, error = self._board, self._error(err)
        # The traceback's frames hold the DataLoader iterator: clear them, or its workers (which ignore
        # SIGTERM) outlive it, and multiprocessing waits for them forever at exit.
        traceback.clear_frames(err.__traceback__)
        self.close()
        if isinstance(error, ShardStallError):
            board.kill_workers()
        return error

    def _error(self, err: Exception) -> BaseException:
        """What a failed ``next`` raises: a worker's shard error on one line, a timeout as the stalled shard."""
        if isinstance(err, ShardError):
            return type(err)(one_line(err))
        if isinstance(err, RuntimeError) and str(err).startswith("DataLoader timed out"):
            stall = self._board.describe_stall()
            return ShardStallError(f"no batch for {self.read_timeout_s:g} s (read_timeout_s): {stall}")
        return err


class TrainLoader(ShardLoader):
    """The per-rank epoch iterable: ``len()`` batches per pass; ``set_epoch`` selects the streams,
    so a pass depends only on (seed, epoch, start batch, rank, num_workers)."""

    def __init__(self, build: Build, *, global_batch_size: int, num_batches: int, **kwargs: Any) -> None:
        super().__init__(build, num_batches=num_batches, **kwargs)
        self.global_batch_size = global_batch_size

    @property
    def num_samples(self) -> int:
        """Samples per epoch over all ranks (``num_samples`` rounded down to whole batches)."""
        return len(self) * self.global_batch_size
