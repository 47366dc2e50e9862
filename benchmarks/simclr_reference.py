"""The instance-contrastive reference of ``bench_learning.py``: SimCLR (Chen et al. 2020) with the recipe's
backbone, projector, views, batch, optimizer and schedule, on one CPU process.

Written here, not in the package: it is a yardstick for the small set (issue 13 compares SMoG against
"an instance-contrastive method (SimCLR) at the same budget"), not a training objective we ship. The
loss is NT-Xent over the 2B views of a batch (each view's positive is the other view of its image, the
other 2B - 2 views are its negatives), temperature ``TEMPERATURE``. Images are drawn uniformly with
replacement from the small set's ImageFolder, as the trainer's shard stream with replacement does.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from smog_scale.config.schema import Config
from smog_scale.config.validation import crop_specs
from smog_scale.data.multicrop import MultiCrop, normalize
from smog_scale.method import schedules
from smog_scale.models.backbone import build_backbone
from smog_scale.models.heads import projector
from smog_scale.training import optim

TEMPERATURE = 0.5  # SimCLR's CIFAR-10 value


def nt_xent(z: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """z: [2, B, D] projector outputs of both views -> mean NT-Xent loss over the 2B views."""
    views, batch = z.shape[:2]
    if views != 2:
        raise ValueError(f"NT-Xent here takes exactly 2 views, got {views}")
    flat = F.normalize(z.flatten(0, 1), dim=1)
    logits = flat @ flat.t() / temperature
    logits.fill_diagonal_(float("-inf"))  # a view is not its own negative
    positives = torch.arange(2 * batch, device=z.device).roll(batch)  # view i of image j <-> the other view of j
    return F.cross_entropy(logits, positives)


def load_images(images: Path) -> list[bytes]:
    """The bytes of every ``*.jpg`` under ``images`` (the small set's ImageFolder), in sorted order."""
    files = sorted(images.rglob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"no *.jpg under {images}")
    return [path.read_bytes() for path in files]


def draw_views(crops: MultiCrop, blobs: list[bytes], batch: int, rng: random.Random) -> torch.Tensor:
    """[2, batch, 3, S, S] normalized: the first two views of ``batch`` images drawn uniformly with replacement."""
    views = [crops(blobs[rng.randrange(len(blobs))], rng) for _ in range(batch)]
    return normalize(torch.stack([torch.stack(v[:2]) for v in views], dim=1))


def train(cfg: Config, images: Path, run: Path, seed: int, steps: int, every: int,
          knn: Callable[[nn.Module], float]) -> None:
    """Train ``steps`` steps on the ``*.jpg`` under ``images``; append ``{"step", "event": "knn", "knn_top1"}``
    to ``run/metrics.jsonl`` every ``every`` steps (``knn`` scores the backbone, which it gets in eval mode)."""
    blobs = load_images(images)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    backbone = build_backbone(cfg.model.backbone, **cfg.model.backbone_kwargs)
    width = cast(int, backbone.num_features)
    net = nn.Sequential(backbone, projector(width, cfg.model.proj_hidden_dim, cfg.model.proj_dim))
    batch = cfg.optim.global_batch_size
    peak = cfg.optim.base_lr * batch / 256
    warmup = round(steps * cfg.optim.warmup_epochs / cfg.optim.epochs)
    optimizer = optim.build_optimizer(net, cfg.optim, peak)
    crops = MultiCrop(crop_specs(cfg))
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "metrics.jsonl", "w") as log:
        for step in range(steps):
            optim.set_learning_rate(optimizer, schedules.learning_rate(step, steps, peak, warmup))
            x = draw_views(crops, blobs, batch, rng)
            loss = nt_xent(net(x.flatten(0, 1)).unflatten(0, (2, batch)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done = step + 1
            log.write(json.dumps({"step": done, "loss": loss.item()}) + "\n")
            if done % every == 0:
                top1 = knn(backbone.eval())
                backbone.train()
                log.write(json.dumps({"step": done, "event": "knn", "knn_top1": top1}) + "\n")
            log.flush()
