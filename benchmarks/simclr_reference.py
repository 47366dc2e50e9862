"""Our SimCLR reference for ``bench_learning.py``: the standard small recipe through the project's own parts.

The same recipe as ``lightly_simclr.py`` (the public package), so that the two rows show whether our pipeline
reproduces the public one: views from ``smog_scale.data.multicrop`` (the trainer's augmentation code, decoding
the JPEG bytes of the ImageFolder: random resized crop at 32 px with scale [0.2, 1] and bilinear resampling,
flip, ``ColorJitter(0.4, 0.4, 0.4, 0.1)`` with p 0.8, grayscale with p 0.2, no blur, ImageNet normalization),
batches drawn without replacement (one seeded permutation per epoch, the last partial batch dropped), the
recipe's backbone from ``smog_scale.models.backbone``, lightly's 512 -> 512 -> 128 projection head (bias-free
Linear, BatchNorm, ReLU, bias-free Linear, BatchNorm), each view through the network on its own (BatchNorm
statistics per view, as lightly's examples call the model once per view; with the head, worth 10 kNN points at
step 250, benchmarks/README.md), NT-Xent at temperature 0.2 over the 2B views, and the trainer's optimizer
factory and schedule
(``training.optim``: SGD, lr 0.06 x batch / 256, momentum 0.9, weight decay 5e-4 except on biases and norm
parameters; ``method.schedules``: cosine to 0, no warm-up).

Written here, not in the package: a yardstick for the benchmark's data, not a training objective we ship.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import TextIO, cast

import torch
from torch import nn

from smog_scale.config.schema import OptimConfig
from smog_scale.data.multicrop import CropSpec, MultiCrop, normalize
from smog_scale.method import schedules
from smog_scale.method.loss import nt_xent
from smog_scale.models.backbone import build_backbone
from smog_scale.training import optim

BATCH = 128
TEMPERATURE = 0.2
HEAD = (512, 128)  # hidden, output
OPTIMIZER = OptimConfig(name="sgd", base_lr=0.06, weight_decay=5e-4, momentum=0.9, warmup_epochs=0)
VIEW = CropSpec(size=32, count=2, scale=(0.2, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                jitter_p=0.8, grayscale_p=0.2, blur_p=0.0, solarize_p=0.0, interpolation="bilinear")


def load_images(images: Path) -> list[bytes]:
    """The bytes of every ``*.jpg`` under ``images`` (an ImageFolder), in sorted order."""
    files = sorted(images.rglob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"no *.jpg under {images}")
    return [path.read_bytes() for path in files]


def epoch_batches(count: int, batch: int, rng: random.Random) -> list[list[int]]:
    """One epoch of full batches of image indices: a permutation of ``count`` cut into ``batch``-sized pieces
    (the remainder dropped), so no image appears twice in a batch."""
    order = rng.sample(range(count), count)
    return [order[start:start + batch] for start in range(0, count - batch + 1, batch)]


def train(images: Path, run: Path, seed: int, steps: int, every: int, backbone_name: str,
          backbone_kwargs: dict, knn: Callable[[nn.Module], float]) -> None:
    """Train ``steps`` steps on the ``*.jpg`` under ``images``; append ``{"step", "event": "knn", "knn_top1"}``
    to ``run/metrics.jsonl`` every ``every`` steps (``knn`` scores the backbone, which it gets in eval mode)."""
    blobs = load_images(images)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    backbone = build_backbone(backbone_name, **backbone_kwargs)
    width = cast(int, backbone.num_features)
    hidden, out = HEAD
    net = nn.Sequential(backbone, nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden),
                        nn.ReLU(inplace=True), nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out))
    peak = OPTIMIZER.base_lr * BATCH / 256
    optimizer = optim.build_optimizer(net, OPTIMIZER, peak)
    crops = MultiCrop([VIEW])
    run.mkdir(parents=True, exist_ok=True)
    step = 0
    with open(run / "metrics.jsonl", "w") as log:
        while step < steps:
            for indices in epoch_batches(len(blobs), BATCH, rng):
                optim.set_learning_rate(optimizer, schedules.learning_rate(step, steps, peak, 0))
                views = torch.stack([torch.stack(crops(blobs[i], rng)) for i in indices], dim=1)  # [2, B, 3, S, S]
                loss = nt_xent(torch.stack([net(view) for view in normalize(views)]), TEMPERATURE)  # BN per view
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                record(log, step, loss.item(), every, backbone, knn)
                if step == steps:
                    break


def record(log: TextIO, step: int, loss: float, every: int, backbone: nn.Module,
           knn: Callable[[nn.Module], float]) -> None:
    """Append the step's loss to ``log``, and every ``every`` steps the backbone's kNN top-1 (scored in eval mode)."""
    log.write(json.dumps({"step": step, "loss": loss}) + "\n")
    if step % every == 0:
        top1 = knn(backbone.eval())
        backbone.train()
        log.write(json.dumps({"step": step, "event": "knn", "knn_top1": top1}) + "\n")
    log.flush()
