"""Linear probe (MoCo v3 / DINO protocol): frozen backbone, BN without affine, one linear head per learning rate.

SGD with momentum and a per-step cosine schedule; gradients are averaged by DDP. Features come cached
(``features.shard_features``) or from augmented batches (:func:`backbone_batches`). Accuracies are percentages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from smog_scale import dist
from smog_scale.data.multicrop import CropSpec, normalize
from smog_scale.eval.accuracy import TOPK, topk_correct
from smog_scale.method import schedules

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (features [B, D], labels [B]) on the device



class LinearProbe(nn.Module):
    """BatchNorm without affine (MAE / MoCo v3 probe), then one linear classifier per learning rate.

    The BN has no parameters and its statistics do not depend on the heads, so the heads train
    independently: the summed loss gives each head exactly the gradient it would get alone.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 1) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        heads = [nn.Linear(dim, num_classes) for _ in range(num_heads)]
        for head in heads:  # MoCo v3 / DINO initialization
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
        self.heads = nn.ModuleList(heads)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits [H, B, C] of features [B, D]."""
        normed = self.norm(feats)
        return torch.stack([head(normed) for head in self.heads])



def train_linear_probe(probe: LinearProbe, accelerator: Accelerator, epoch_batches: Callable[[int], Batches], *,
                       epochs: int, steps_per_epoch: int, lrs: Sequence[float], momentum: float = 0.9,
                       weight_decay: float = 0.0) -> LinearProbe:
    """SGD with momentum, head h at ``lrs[h]`` following a per-step cosine to 0 over all steps.

    ``epoch_batches(epoch)`` yields this rank's (features, labels) on the device; every rank takes
    ``steps_per_epoch`` steps per epoch and DDP (``accelerator.prepare_model``) averages the gradients.
    """
    if len(lrs) != len(probe.heads) or steps_per_epoch < 1:
        raise ValueError(f"{len(lrs)} lrs for {len(probe.heads)} heads, {steps_per_epoch} steps per epoch")
    optimizer = torch.optim.SGD([{"params": head.parameters(), "lr": lr} for head, lr in zip(probe.heads, lrs)],
                                lr=lrs[0], momentum=momentum, weight_decay=weight_decay)
    model = accelerator.prepare_model(probe)
    total, step = epochs * steps_per_epoch, 0
    bar = tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not accelerator.is_main_process)
    for epoch in bar:
        model.train()
        for feats, labels in islice(epoch_batches(epoch), steps_per_epoch):
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = schedules.cosine(step, total, lr, 0.0)
            logits = model(feats)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat(len(lrs))) * len(lrs)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            step += 1
        if step != (epoch + 1) * steps_per_epoch:
            raise RuntimeError(f"rank {dist.rank()}: epoch {epoch} ended after {step - epoch * steps_per_epoch} "
                               f"of {steps_per_epoch} steps")
        bar.set_postfix(loss=f"{loss.item() / len(lrs):.4f}")
    return probe



def shuffled_batches(feats: torch.Tensor, labels: torch.Tensor, batch_size: int, epoch: int,
                     seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Full batches of cached features in an order drawn from (seed, epoch, rank)."""
    generator = torch.Generator().manual_seed(hash((seed, epoch, dist.rank())))
    order = torch.randperm(len(feats), generator=generator).to(feats.device)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start:start + batch_size]
        yield feats[index], labels[index]



def probe_train_crop(size: int) -> CropSpec:
    """The linear probe's training augmentation (MoCo v3, DINO): RandomResizedCrop(0.08-1, bilinear) + flip."""
    return CropSpec(size=size, scale=(0.08, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, interpolation="bilinear")



@torch.no_grad()
def backbone_batches(backbone: nn.Module, batches: Iterable[dict[str, Any]],
                     accelerator: Accelerator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Frozen (eval-mode) backbone features of ``shards.build_train_loader`` batches with one crop."""
    backbone.eval()
    for batch in batches:
        images = normalize(batch["crops"][0][0].to(accelerator.device, non_blocking=True))
        with accelerator.autocast():
            feats = backbone(images).float()
        yield feats, batch["cls"].to(accelerator.device)



@torch.no_grad()
def probe_accuracy(probe: LinearProbe, feats: torch.Tensor, labels: torch.Tensor,
                   chunk: int = 8192) -> list[dict[str, float]]:
    """Top-1 / top-5 (percent) of every head on un-normalized features [M, D] (pass the gathered ones)."""
    probe.eval()
    correct = torch.zeros(len(probe.heads), len(TOPK), dtype=torch.long)
    for part, targets in zip(feats.split(chunk), labels.split(chunk)):
        for h, logits in enumerate(probe(part)):
            correct[h] += torch.tensor(topk_correct(logits, targets))
    return [{f"top{k}": 100.0 * float(c) / len(labels) for k, c in zip(TOPK, row)} for row in correct]
