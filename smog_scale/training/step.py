"""One SMoG optimizer step: per micro-batch forwards, grouping, loss and backward; then the step's commit.

Shared by the trainer and the tests: grouping, loss and finiteness per micro-batch, then the optimizer
step and the step's commit.

Data flow (docs/method.md "One training step"): labels from the momentum features with the OLD
groups, assignment of the online global views with the OLD groups, synchronous update to G', group
contrast loss against G'. Each micro-batch backpropagates; the last one of an optimizer step steps the
optimizer and, unless the step was skipped, commits G and the cache pushes
(``smog_scale.method.accumulation``) and the momentum EMA.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer

from smog_scale import dist
from smog_scale.config.schema import Config, Derived
from smog_scale.data.multicrop import normalize
from smog_scale.method import schedules
from smog_scale.method.accumulation import StepAccumulator
from smog_scale.method.feature_cache import FeatureCache
from smog_scale.method.grouping import GroupBank
from smog_scale.method.health import assignment_health
from smog_scale.method.objectives import GroupingStep, objective_step
from smog_scale.training import deepspeed_launch
from smog_scale.training.optim import set_learning_rate


@dataclass
class TrainState:
    """Everything a step reads or advances; the counters are checkpointed in ``trainer_state.json``."""

    cfg: Config
    derived: Derived
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by Accelerate (maybe DDP-wrapped)
    optimizer: AcceleratedOptimizer  # Accelerate's wrapper: it knows whether the scaler skipped the step
    bank: GroupBank
    cache: FeatureCache
    global_step: int = 0  # optimizer steps taken (committed); the schedules' clock
    data_steps: int = 0  # optimizer steps' worth of batches consumed, skipped ones too; the loader's position
    samples_seen: int = 0  # over all ranks, skipped steps included
    skipped_samples: int = 0  # corrupt samples / unreadable shards skipped by the loader, all ranks
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss, features or groups on some rank
    overflow_steps: int = 0  # steps the optimizer skipped for non-finite gradients (fp16 loss-scale overflow)
    nonfinite_streak: int = 0  # skipped steps in a row, either reason
    stop_signal: bool = False  # set by SIGTERM/SIGUSR1 on this rank, at any moment (never cleared)
    stop_requested: bool = False  # some rank's stop_signal, as every rank learned it in the same step
    accumulator: StepAccumulator = field(init=False)  # the optimizer step in progress (empty between steps)

    def __post_init__(self) -> None:
        self.accumulator = StepAccumulator(self.bank.groups.device)

    def counters(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("global_step", "data_steps", "samples_seen", "skipped_samples",
                                               "nonfinite_steps", "overflow_steps", "nonfinite_streak")}


class StepEnd(NamedTuple):
    """The end of an optimizer step: whether it committed, and what to log.

    ``committed`` false: the step was skipped. ``metrics``: device tensors / floats for logging (read only
    on log steps)."""

    committed: bool
    metrics: dict[str, torch.Tensor | float]


def train_step(state: TrainState, batch: dict) -> StepEnd | None:
    """One micro-batch: forwards, grouping against the step's G, loss, backward; the last one also finishes.

    At the last micro-batch of an optimizer step also :func:`finish_step`. Returns None before that.

    The one host sync per micro-batch is the all-reduce of (non-finite, stop requested, loader skips):
    every rank must agree on skipping a step. Once a micro-batch was non-finite the step is lost and the
    rest of its micro-batches skip their backward.
    """
    cfg, derived, acc = state.cfg, state.derived, state.accelerator
    step, total = state.global_step, derived.total_steps
    set_learning_rate(state.optimizer, schedules.learning_rate(
        step, total, derived.scaled_lr, derived.warmup_steps, cfg.optim.final_lr))
    beta = schedules.group_beta(step, total, cfg.grouping.beta_start, cfg.grouping.beta_end, cfg.grouping.beta_schedule)
    crops = [normalize(c.to(acc.device, non_blocking=True)) for c in batch["crops"]]
    if state.accumulator.micro_batches == 0:
        state.accumulator.start(state.model.buffers())
    with acc.accumulate(state.model):
        with acc.autocast():
            out = state.model(crops)
        result = objective_step(out, cfg, state.bank, beta, step)
        bad_ranks, stop_ranks, skipped = step_flags(result.ok, state.stop_signal, batch.get("skipped", 0)).tolist()
        state.stop_requested = stop_ranks > 0
        state.skipped_samples += int(skipped)
        if isinstance(result, GroupingStep):
            ids = torch.tensor([zlib.crc32(k.encode()) for k in batch["key"]], device=acc.device)
            state.accumulator.add(result.loss, bad_ranks > 0, result.stats,
                                  (result.cache_feats, ids.repeat(out.e.shape[0])), result.health)
        else:
            state.accumulator.add(result.loss, bad_ranks > 0)
        if not state.accumulator.nonfinite:
            acc.backward(result.loss)
        return finish_step(state, beta) if acc.sync_gradients else None


def step_flags(ok: torch.Tensor, stop_signal: bool, skipped_samples: int) -> torch.Tensor:
    """What every rank must agree on: [3] floats summed over ranks, on ``ok``'s device.

    Ranks whose micro-batch was not finite (``ok``: 0-dim bool), ranks asked to stop, samples the loaders
    skipped."""
    host = torch.tensor([float(stop_signal), float(skipped_samples)], device=ok.device)
    return dist.all_reduce_sum(torch.cat([(~ok).float().view(1), host]))


def finish_step(state: TrainState, beta: float) -> StepEnd:
    """The optimizer step (unless a micro-batch was non-finite), then its commit, or nothing if it was skipped.

    The commit: G from the step's statistics, cache pushes, momentum EMA, ``global_step``. When the step
    was skipped (non-finite, or the fp16 loss scaler found an overflow), nothing but the skip counters: G,
    the cache, the model (its BatchNorm statistics put back) and therefore every schedule stay as they
    were. The loader position advances either way."""
    cfg, acc, optimizer, pending = state.cfg, state.accelerator, state.optimizer, state.accumulator
    if not pending.nonfinite:
        if cfg.optim.clip_grad_norm:
            acc.clip_grad_norm_(state.model.parameters(), cfg.optim.clip_grad_norm)
        optimizer.step()  # under DeepSpeed a no-op: the engine stepped in acc.backward
    skipped = "nonfinite" if pending.nonfinite else "overflow" if optimizer.step_was_skipped else None
    optimizer.zero_grad(set_to_none=True)  # under DeepSpeed a no-op: the engine zeroes them when it steps
    if pending.nonfinite and deepspeed_launch.uses_deepspeed(acc):  # the engine did not step
        deepspeed_launch.drop_gradients(state.model)
    metrics: dict[str, torch.Tensor | float] = {"loss": pending.mean_loss(), "lr": optimizer.param_groups[0]["lr"]}
    if pending.stats is not None:  # SMoG (the BYOL objective has no groups)
        agreement, hit_rate = pending.mean_health()
        metrics.update(beta=beta, label_agreement=agreement, prediction_hit_rate=hit_rate,
                       **assignment_health(pending.stats.counts))
    if skipped is None:
        pending.commit(state.bank, state.cache, beta, cfg.grouping.update)
        acc.unwrap_model(state.model).update_momentum(
            schedules.ema_momentum(state.global_step, state.derived.total_steps, cfg.optim.ema_start))
        state.global_step += 1
    else:
        pending.discard()
        state.nonfinite_steps += int(skipped == "nonfinite")
        state.overflow_steps += int(skipped == "overflow")
    state.nonfinite_streak = 0 if skipped is None else state.nonfinite_streak + 1
    state.data_steps += 1
    state.samples_seen += cfg.optim.global_batch_size
    return StepEnd(skipped is None, metrics)
