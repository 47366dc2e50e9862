"""The positive control of ``bench_learning.py``: the public ``lightly`` package's SimCLR in the standard small recipe.

Written with lightly's own parts, as its CIFAR-10 examples are: ``SimCLRTransform`` (random resized crop at
32 px with scale [0.2, 1], horizontal flip, ``ColorJitter(0.4, 0.4, 0.4, 0.1)`` with p 0.8 through
``cj_strength=0.5``, grayscale with p 0.2, no blur, ImageNet normalization), ``SimCLRProjectionHead`` (512 ->
512 -> 128), ``NTXentLoss`` at temperature 0.2, on torchvision's ``ImageFolder`` with a shuffling DataLoader
(batches drawn without replacement, the last partial batch dropped); SGD with lr 0.06 x batch / 256, momentum
0.9 and weight decay 5e-4 on every parameter, a cosine schedule to 0 and no warm-up. The backbone is the recipe's
(timm's ResNet-18 with its ImageNet stem), so every row of the benchmark trains the same network. Needs the
``bench`` extra (``pip install -e .[bench]``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from simclr_reference import record
from torch import nn

from smog_scale.models.backbone import build_backbone

BATCH = 128
BASE_LR, MOMENTUM, WEIGHT_DECAY = 0.06, 0.9, 5e-4  # lr = BASE_LR x batch / 256
TEMPERATURE = 0.2
HEAD = (512, 128)  # hidden, output
SIZE, MIN_SCALE, JITTER_STRENGTH = 32, 0.2, 0.5  # lightly's recommendation for CIFAR-sized images


def train(images: Path, run: Path, seed: int, steps: int, every: int, backbone_name: str,
          backbone_kwargs: dict, knn: Callable[[nn.Module], float]) -> None:
    """Train ``steps`` steps on the ImageFolder ``images``; append ``{"step", "event": "knn", "knn_top1"}`` to
    ``run/metrics.jsonl`` every ``every`` steps (``knn`` scores the backbone, which it gets in eval mode)."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from torchvision.datasets import ImageFolder

    torch.manual_seed(seed)
    backbone = build_backbone(backbone_name, **backbone_kwargs)
    net = nn.Sequential(backbone, SimCLRProjectionHead(cast(int, backbone.num_features), *HEAD))
    transform = SimCLRTransform(input_size=SIZE, cj_strength=JITTER_STRENGTH, min_scale=MIN_SCALE, gaussian_blur=0.0)
    dataset = ImageFolder(str(images), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    criterion = NTXentLoss(temperature=TEMPERATURE)
    optimizer = torch.optim.SGD(net.parameters(), lr=BASE_LR * BATCH / 256, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    run.mkdir(parents=True, exist_ok=True)
    step = 0
    with open(run / "metrics.jsonl", "w") as log:
        while step < steps:
            for (view_a, view_b), _ in loader:
                loss = criterion(net(view_a), net(view_b))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                record(log, step, loss.item(), every, backbone, knn)
                if step == steps:
                    break
