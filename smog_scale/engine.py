"""One SMoG step's math, shared by the trainer and the tests: grouping, loss and finiteness.

Data flow (ALGORITHM.md "One training step"): labels from the momentum features with the OLD
groups, assignment of the online global views with the OLD groups, synchronous update to G', group
contrast loss against G'. The caller backpropagates, steps, then commits G' and pushes the cache
only where ``ok``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from smog_scale import dist, schedules
from smog_scale.config import Config, Derived
from smog_scale.data.multicrop import normalize
from smog_scale.feature_cache import FeatureCache
from smog_scale.grouping import GroupBank, assign, momentum_update_from_assignments
from smog_scale.loss import group_contrast_loss
from smog_scale.metrics import assignment_health
from smog_scale.models.smog import SMoGOutput
from smog_scale.optim import set_learning_rate


class GroupingStep(NamedTuple):
    """loss: scalar; new_groups: [K, D] g'; counts: [K] global members; cache_feats: [G*B, D]
    normalized momentum features of the global views; ok: 0-dim bool, everything finite."""

    loss: torch.Tensor
    new_groups: torch.Tensor
    counts: torch.Tensor
    cache_feats: torch.Tensor
    ok: torch.Tensor


def grouping_step(
    out: SMoGOutput, groups: torch.Tensor, beta: float, tau: float, cache_online: bool = False
) -> GroupingStep:
    """ALGORITHM.md steps 1-4 on one rank's model outputs; the update covers all ranks."""
    num_global, batch = out.e.shape[:2]
    dtype = torch.promote_types(out.z.dtype, torch.float32)
    with torch.autocast(out.z.device.type, enabled=False):  # grouping in float32 at least
        e = F.normalize(out.e.to(dtype), dim=-1)
        z_global = F.normalize(out.z[:num_global].to(dtype), dim=-1).flatten(0, 1)
        labels = assign(groups, e.flatten(0, 1)).view(num_global, batch)  # step 1
        update = momentum_update_from_assignments(groups, z_global, assign(groups, z_global), beta)  # 2-3
    loss = group_contrast_loss(out.p, labels, update.new_groups, tau)  # step 4
    cache_feats = z_global.detach() if cache_online else e.flatten(0, 1)  # step 6 (choice)
    ok = torch.isfinite(loss) & torch.isfinite(update.new_groups).all() & torch.isfinite(cache_feats).all()
    return GroupingStep(loss, update.new_groups, update.counts, cache_feats, ok)


@dataclass
class TrainState:
    """Everything a step reads or advances; counters are checkpointed in ``trainer_state.json``."""

    cfg: Config
    derived: Derived
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by Accelerate (maybe DDP-wrapped)
    optimizer: torch.optim.Optimizer
    bank: GroupBank
    cache: FeatureCache
    global_step: int = 0  # optimizer steps taken
    samples_seen: int = 0  # over all ranks
    skipped_samples: int = 0  # corrupt samples / unreadable shards skipped by the loader, all ranks
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss, features or groups
    nonfinite_streak: int = 0
    stop_signal: bool = False  # set by SIGTERM/SIGUSR1 on this rank, at any moment (never cleared)
    stop_requested: bool = False  # some rank's stop_signal, as every rank learned it in the same step

    def counters(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in
                ("global_step", "samples_seen", "skipped_samples", "nonfinite_steps", "nonfinite_streak")}


def train_step(state: TrainState, batch: dict) -> dict[str, torch.Tensor]:
    """One micro-batch: forwards, grouping, loss, backward, optimizer step, EMA, G and cache commits.

    Returns device tensors for logging (read only on log steps). The one host sync per step is the
    all-reduce of (non-finite, stop requested, loader skips): every rank must agree on skipping a step.
    """
    cfg, derived, acc = state.cfg, state.derived, state.accelerator
    step, total = state.global_step, derived.total_steps
    set_learning_rate(state.optimizer, schedules.learning_rate(
        step, total, derived.scaled_lr, derived.warmup_steps, cfg.optim.final_lr))
    beta = schedules.group_beta(step, total, cfg.grouping.beta_start, cfg.grouping.beta_end)
    crops = [normalize(c.to(acc.device, non_blocking=True)) for c in batch["crops"]]
    with acc.accumulate(state.model):
        with acc.autocast():
            out = state.model(crops)
        result = grouping_step(out, state.bank.groups, beta, cfg.grouping.tau, cfg.grouping.cache_features == "online")
        host_flags = torch.tensor([float(state.stop_signal), float(batch.get("skipped", 0))], device=acc.device)
        flags = dist.all_reduce_sum(torch.cat([(~result.ok).float().view(1), host_flags]))
        bad_ranks, stop_ranks, skipped = flags.tolist()
        ok = bad_ranks == 0
        if ok:
            acc.backward(result.loss)
            if cfg.optim.clip_grad_norm and acc.sync_gradients:
                acc.clip_grad_norm_(state.model.parameters(), cfg.optim.clip_grad_norm)
            state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
    ok_tensor = torch.tensor(ok, device=acc.device)
    state.bank.commit(result.new_groups, ok_tensor)
    ids = torch.tensor([zlib.crc32(k.encode()) for k in batch["key"]], device=acc.device).repeat(out.e.shape[0])
    state.cache.push(result.cache_feats, ids, ok_tensor)
    state.stop_requested = stop_ranks > 0
    state.nonfinite_streak = 0 if ok else state.nonfinite_streak + 1
    state.nonfinite_steps += int(not ok)
    state.skipped_samples += int(skipped)
    if acc.sync_gradients:
        if ok:
            acc.unwrap_model(state.model).update_momentum(
                schedules.ema_momentum(step, total, cfg.optim.ema_start))
        state.global_step += 1
        state.samples_seen += cfg.optim.global_batch_size
    return {"loss": result.loss.detach(), "lr": torch.tensor(state.optimizer.param_groups[0]["lr"]),
            "beta": torch.tensor(beta), **assignment_health(result.counts)}
