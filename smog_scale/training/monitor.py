"""The kNN monitor during training: a failure to read its shards is logged and costs nothing.

It is a collective, so a rank whose shards fail (gone, unreadable) must still run every collective the
others run: its loaders end early instead of raising, it joins the extraction with what it read, and the
ranks then agree through an all-reduce whether any failed. Training goes on either way, and no
checkpoint is lost to the monitor.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from smog_scale import dist
from smog_scale.data.shards import build_eval_loader
from smog_scale.eval.knn import knn_monitor
from smog_scale.training.run_log import RunLog
from smog_scale.training.step import TrainState


class _Guarded:
    """A loader that ends early instead of raising; the error is kept, so that a rank whose shards fail
    still runs the collectives that follow, in step with the others."""

    def __init__(self, make: Callable[[], Iterable[Any]]) -> None:
        self.make = make
        self.error: str | None = None

    def __iter__(self) -> Iterator:
        try:
            yield from self.make()
        except Exception as err:  # noqa: BLE001  (ShardOpenError, a worker error, a manifest gone...)
            self.error = str(err).strip().splitlines()[-1]


def knn(state: TrainState, log: RunLog, reading: Mapping[str, Any]) -> None:
    """Log kNN top-1/top-5 of the online backbone on held-out labelled shards (a collective); ``reading``:
    the shard reading settings (``open_attempts``, ...). A failure to read them, on any rank, is logged as a
    "knn_failed" event and training goes on: the ranks agree first."""
    mon, acc, step = state.cfg.monitor, state.accelerator, state.global_step
    loaders = [_Guarded(functools.partial(
        build_eval_loader, urls, image_size=mon.image_size, batch_size=mon.batch_size,
        num_workers=state.cfg.data.num_workers, rank=dist.rank(), world_size=dist.world_size(),
        **reading)) for urls in (mon.knn_train_shards, mon.knn_val_shards)]
    backbone = acc.unwrap_model(state.model).online.backbone
    result: dict[str, float] | None = None
    try:  # a failing rank's loaders end early and it joins the collectives with what it read
        result = knn_monitor(acc, backbone, *loaders)
        errors = [loader.error for loader in loaders if loader.error]
    except ValueError as err:  # raised alike on every rank (from gathered counts): no sample read at all
        errors = [loader.error for loader in loaders if loader.error] or [str(err)]
    failed = int(dist.all_reduce_sum(torch.tensor([int(bool(errors))], device=acc.device)).item())
    if not failed and result is not None:
        log.event(step, "knn", result)
        return
    if errors and not acc.is_main_process:
        print(f"smog_scale: warning: rank {dist.rank()}: kNN monitor at step {step}: {errors[0]}", file=sys.stderr)
    log.event(step, "knn_failed", {"failed_ranks": float(failed)})
    log.message(f"step {step}: kNN monitor failed on {failed} rank(s) ({errors[0] if errors else 'see their warnings'}"
                "); training goes on")
