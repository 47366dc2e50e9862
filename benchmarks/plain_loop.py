"""The yardstick of ``bench_step.py``: the trainer's SMoG step written as the shortest correct PyTorch loop.

Written here, not in the package: it is what the trainer's step must not cost more than (issue 22). It does
the trainer's work with none of its machinery: the same networks (``SMoGModel``), crops (the recipe's
``MultiCrop``, decoded in this process from the same JPEG bytes), objective (labels and assignments against
the old groups, the synchronous momentum update, the group contrast loss: the package's functions of
tensors, docs/method.md steps 1-6), optimizer (``build_optimizer``: the recipe's LARS / SGD / AdamW with the
trainer's parameter groups) and schedules (lr, beta, EMA m as functions of the step). What it leaves out is
the trainer's bookkeeping: no Accelerate, no loader processes, no finiteness check or skipped steps (nor the
buffer snapshot they need), no gradient accumulation, no health signals, metrics or log files; it reads the
loss once per log step, where the trainer's log reads it too.
"""

from __future__ import annotations

import random
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from smog_scale.config.schema import Config, Derived
from smog_scale.config.validation import crop_specs
from smog_scale.data.multicrop import MultiCrop, collate_views, normalize
from smog_scale.method import schedules
from smog_scale.method.grouping import assign, group_update
from smog_scale.method.loss import group_contrast_loss
from smog_scale.models.smog import SMoGModel
from smog_scale.training.optim import build_optimizer, set_learning_rate


def load_images(shards: Path) -> list[bytes]:
    """The image bytes (``.jpg``) of every sample in the ``*.tar`` shards under ``shards``, in sorted order."""
    images = []
    for shard in sorted(Path(shards).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                file = tar.extractfile(member) if member.name.endswith(".jpg") else None
                if file is not None:
                    images.append(file.read())
    if not images:
        raise FileNotFoundError(f"no .jpg samples in the shards under {shards}")
    return images


class PlainSMoG:
    """The networks, groups, cache and optimizer of a one-process SMoG run, and its step.

    Built in the trainer's order from the same seed (model, then the groups), so both start equal.
    Only the recipes' grouping choices are written out: the momentum update, momentum features cached.
    """

    def __init__(self, cfg: Config, derived: Derived) -> None:
        if cfg.grouping.update != "momentum" or cfg.grouping.cache_features != "momentum":
            raise ValueError("the plain loop implements grouping.update=momentum, cache_features=momentum only")
        self.cfg, self.derived = cfg, derived
        torch.manual_seed(cfg.run.seed)
        mc = cfg.model
        self.model = SMoGModel(mc.backbone, mc.proj_hidden_dim, mc.proj_dim, mc.pred_hidden_dim, mc.backbone_kwargs)
        if mc.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.groups = F.normalize(torch.randn(cfg.grouping.num_groups, mc.proj_dim), dim=1)  # G [K, D]
        self.cache = torch.zeros(derived.cache_size_per_device, mc.proj_dim)  # FIFO of momentum features
        self.cached = 0  # rows pushed so far; the next row goes to cached % capacity
        self.optimizer = build_optimizer(self.model, cfg.optim, derived.scaled_lr)

    def step(self, crops: Sequence[torch.Tensor], step: int) -> torch.Tensor:
        """One optimizer step on uint8 crops (per resolution [V_s, B, 3, S, S], the loader's layout); returns
        the loss (0-dim, not read here)."""
        cfg, total = self.cfg, self.derived.total_steps
        set_learning_rate(self.optimizer, schedules.learning_rate(
            step, total, self.derived.scaled_lr, self.derived.warmup_steps, cfg.optim.final_lr))
        beta = schedules.group_beta(step, total, cfg.grouping.beta_start, cfg.grouping.beta_end,
                                    cfg.grouping.beta_schedule)
        out = self.model([normalize(c) for c in crops])
        num_global, batch = out.e.shape[:2]
        e = F.normalize(out.e, dim=-1).flatten(0, 1)  # [G*B, D]
        z = F.normalize(out.z[:num_global], dim=-1).flatten(0, 1)
        labels = assign(self.groups, e).view(num_global, batch)  # step 1
        new_groups = group_update(self.groups, z, assign(self.groups, z), beta).new_groups  # steps 2-3
        loss = group_contrast_loss(out.p, labels, new_groups, cfg.grouping.tau)  # step 4
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.groups = F.normalize(new_groups.detach(), dim=1)  # step 5
        rows = (self.cached + torch.arange(e.shape[0])) % self.cache.shape[0]
        self.cache[rows] = e  # step 6
        self.cached += e.shape[0]
        self.model.update_momentum(schedules.ema_momentum(step, total, cfg.optim.ema_start))
        return loss


def seconds_per_step(cfg: Config, derived: Derived, images: list[bytes], steps: int, warmup: int) -> float:
    """Train ``steps`` steps on ``images`` drawn uniformly with replacement (as the trainer's resampled shards
    are); returns the wall seconds per step over steps ``warmup + 1 .. steps``. The crops are decoded here,
    in the training process, between the steps."""
    plain = PlainSMoG(cfg, derived)
    crops = MultiCrop(crop_specs(cfg))
    rng = random.Random(cfg.run.seed)
    batch = derived.batch_size_per_device
    start = 0.0
    for step in range(steps):
        samples = [{"crops": crops(images[rng.randrange(len(images))], rng), "cls": 0, "key": ""}
                   for _ in range(batch)]
        loss = plain.step(collate_views(samples)["crops"], step)
        if (step + 1) % cfg.run.log_every == 0 and not torch.isfinite(loss).item():
            raise FloatingPointError(f"the plain loop's loss is {loss.item()} at step {step + 1}")
        if step + 1 == warmup:
            start = time.perf_counter()
    return (time.perf_counter() - start) / (steps - warmup)
