"""A process pool whose dead workers are named: what ``smog-make-shards`` runs its shard writers in.

``concurrent.futures`` raises ``BrokenProcessPool`` when a worker dies abruptly (a
``multiprocessing.Pool`` would wait for it forever) but cannot say what the worker was doing; SIGKILL
(the out-of-memory killer) cannot be caught. So each worker marks the input it starts on in shared
memory (:func:`mark`), and the main process reads the marks left by the workers that died. Written
here because neither the standard library nor webdataset's writers do this.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

_MARK_BYTES = 2048  # per worker: what it is on (shard name and input origin), cut to this length


class WorkerDied(RuntimeError):
    """A worker process ended abruptly; the message names what it was on."""


class _Board:
    """What each worker process is on, in shared memory.

    Each worker takes a slot in the pool's initializer. A worker that the pool itself terminates
    (after another one died) clears its slot on SIGTERM, so the slots still marked after the pool
    has shut down are the workers that died abruptly.
    """

    current: tuple[_Board, int] | None = None  # in a worker process: its board and slot

    def __init__(self, workers: int) -> None:
        context = multiprocessing.get_context()
        self._marks = context.RawArray("c", workers * _MARK_BYTES)
        self._taken = context.Value("i", 0)

    def init_worker(self) -> None:
        """The pool's ``initializer``: take a slot; on SIGTERM clear it and exit."""
        with self._taken.get_lock():
            slot, self._taken.value = self._taken.value, self._taken.value + 1
        _Board.current = (self, slot)

        def terminated(signum: int, _frame: object) -> None:
            self.mark(slot, "")
            os._exit(128 + signum)

        signal.signal(signal.SIGTERM, terminated)

    def mark(self, slot: int, text: str) -> None:
        data = text.encode(errors="replace")[: _MARK_BYTES - 1]
        self._marks[slot * _MARK_BYTES:slot * _MARK_BYTES + len(data) + 1] = data + b"\0"

    def marked(self) -> list[str]:
        raw = self._marks.raw
        texts = (raw[i:i + _MARK_BYTES].split(b"\0", 1)[0].decode(errors="replace")
                 for i in range(0, len(raw), _MARK_BYTES))
        return [text for text in texts if text]


def mark(text: str) -> None:
    """In a pool worker: record what it starts on ("" between items); a no-op outside a pool."""
    if _Board.current is not None:
        board, slot = _Board.current
        board.mark(slot, text)


def map_unordered(fn: Callable[[Any], Any], items: Sequence[Any], workers: int, *, who: str,
                  advice: str) -> Iterator[Any]:
    """``fn(item)`` for every item as they complete: in this process, or in a pool of ``workers`` processes.

    A worker that dies abruptly ends the map with ``WorkerDied``: "a <who> process died abruptly (killed:
    out of memory?) while <its marks>; <advice>", raised after the pool has shut down.
    """
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    board = _Board(min(workers, len(items)))
    pool = ProcessPoolExecutor(min(workers, len(items)), initializer=board.init_worker)
    try:
        yield from (future.result() for future in as_completed([pool.submit(fn, item) for item in items]))
    except BrokenProcessPool:
        pool.shutdown(wait=True)  # every worker joined: only the slots of those that died abruptly are marked
        what = "; ".join(board.marked()) or "between two items"
        raise WorkerDied(f"a {who} process died abruptly (killed: out of memory?) while {what}; {advice}") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error here, items not yet started are not
