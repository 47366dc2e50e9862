"""Semi-supervised fine-tuning (the paper's Table 4): the whole backbone plus a linear classifier on few labels.

Protocol of SimCLR (Chen et al. 2020, appendix B.5), which BYOL and SMoG report under: SGD with
Nesterov momentum 0.9, no weight decay or other regularization, no warm-up, lr = base lr x global
batch / 256 with base lr 0.05; 60 epochs on 1% of the labels, 30 on 10%; augmentation is only a
random resized crop (0.08-1) with a horizontal flip; evaluation on a center crop (resize to S / 0.875,
crop S). As in SimCLR's code the classifier starts at zero (``zero_init_logits_layer``), BatchNorm
trains and is synchronized across CUDA ranks (SimCLR's global BN), and the lr follows a cosine to 0.

The run is resumable per epoch: ``WORK/checkpoint.pt`` (model, optimizer, epoch, per-epoch history,
and the settings that decide the result) is written after every epoch, and a rerun with the same
settings continues after the last complete epoch; with all epochs done it only evaluates.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from smog_scale import dist
from smog_scale.data.multicrop import normalize
from smog_scale.data.shards import (
    MANIFEST_NAME,
    ShardLoader,
    TrainLoader,
    build_eval_loader,
    build_train_loader,
    read_manifest,
)
from smog_scale.data.subset import (
    KEYS_NAME,
    Sample,
    balanced_subset,
    list_samples,
    subset_digest,
    subset_from_names,
    write_subset_shards,
)
from smog_scale.eval.accuracy import TOPK, topk_correct
from smog_scale.eval.features import extract_features
from smog_scale.eval.linear_probe import probe_train_crop
from smog_scale.method import schedules

CHECKPOINT_NAME = "checkpoint.pt"
SUBSET_DIR = "subset"


class MainProcessFailed(ValueError):
    """Raised on the other ranks when the main process failed (and said why)."""


def prepare_subset(train_shards: str, work_dir: Path, keys_file: Path, accelerator: Accelerator, *,
                   fraction: float | None, names_file: Path | None, seed: int, workers: int) -> dict[str, Any]:
    """The subset's shards in ``work_dir/subset`` and its keys in ``keys_file``, written by the main process
    (kept from an earlier run when the subset is the same); returns their manifest on every rank.

    ``fraction``: a class-balanced draw with ``seed``; ``names_file``: the images it names (one per line).
    Raises on every rank if the main process fails (a name not in the shards, a class left empty ...).
    """
    folder, error = work_dir / SUBSET_DIR, None
    if accelerator.is_main_process:
        try:
            classes = read_manifest(train_shards)["classes"]
            samples = list_samples(train_shards, workers)
            if names_file is not None:
                chosen = subset_from_names(samples, names_file.read_text().splitlines(), str(names_file))
            else:
                chosen = balanced_subset(samples, fraction or 0.0, classes, seed)
            _refuse_other_subset(work_dir / CHECKPOINT_NAME, chosen)
            write_subset_shards(chosen, folder, classes, seed)
            keys_file.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / KEYS_NAME, keys_file)
        except (ValueError, OSError, KeyError) as err:
            error = err if not isinstance(err, KeyError) else ValueError(f"{train_shards}: manifest without {err}")
    failed = dist.broadcast(torch.tensor([error is not None], dtype=torch.long, device=accelerator.device))
    if error is not None:
        raise error
    if bool(failed.item()):
        raise MainProcessFailed("the main process could not prepare the fine-tuning subset")
    return json.loads((folder / MANIFEST_NAME).read_text())


def _refuse_other_subset(file: Path, chosen: list[Sample]) -> None:
    """Raise before the subset's shards are replaced under a checkpoint that fine-tunes another subset."""
    if file.is_file():
        trained_on = torch.load(file, map_location="cpu", weights_only=True, mmap=True)["settings"]["subset_sha256"]
        if trained_on != subset_digest(chosen):
            raise ValueError(f"{file} fine-tunes another subset; remove {file.parent} or choose another --out")


def subset_loader(work_dir: Path, num_shards: int, *, image_size: int, batch_size: int, workers: int,
                  seed: int) -> TrainLoader:
    """This rank's augmented batches of the subset (``batch_size`` is global): each shard once per epoch,
    split over ranks and loader workers, or drawn with replacement when there are fewer shards than those."""
    world = dist.world_size()
    return build_train_loader(str(work_dir / SUBSET_DIR), crops=[probe_train_crop(image_size)],
                              batch_size=batch_size // world, num_workers=workers, seed=seed, rank=dist.rank(),
                              world_size=world, resampled=num_shards < max(1, workers) * world)


class Classifier(nn.Module):
    """A backbone (pooled features [B, D]) and a linear classifier that starts at zero (SimCLR)."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(num_features, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of normalized images [B, 3, S, S]."""
        return self.head(self.backbone(images))


@dataclass(frozen=True)
class Settings:
    """What decides a fine-tuning result; a checkpoint resumes only under equal settings."""

    source: str
    subset_sha256: str
    num_classes: int
    epochs: int
    base_lr: float
    batch_size: int  # global
    momentum: float
    nesterov: bool
    weight_decay: float
    image_size: int
    seed: int

    @property
    def peak_lr(self) -> float:
        return self.base_lr * self.batch_size / 256


def batch_loss(model: nn.Module, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Mean cross-entropy (float32, 0-dim) of a ``shards.build_train_loader`` batch with one crop:
    ``crops[0]`` uint8 [1, B, 3, S, S], ``cls`` [B]; the images are normalized in the model's dtype."""
    dtype = next(model.parameters()).dtype
    images = normalize(batch["crops"][0][0].to(device, non_blocking=True), dtype)
    return F.cross_entropy(model(images).float(), batch["cls"].to(device, non_blocking=True))


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[dict[str, Any]],
                accelerator: Accelerator, settings: Settings, epoch: int, steps_per_epoch: int) -> float:
    """One epoch of ``steps_per_epoch`` steps, lr on a per-step cosine over all epochs; the mean loss over ranks."""
    model.train()
    total, sums = settings.epochs * steps_per_epoch, torch.zeros(2, device=accelerator.device)
    bar = tqdm(batches, total=steps_per_epoch, desc=f"fine-tune epoch {epoch + 1}/{settings.epochs}", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    steps = 0
    for batch in bar:
        lr = schedules.cosine(epoch * steps_per_epoch + steps, total, settings.peak_lr, 0.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = batch_loss(model, batch, accelerator.device)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        sums += torch.stack([loss.detach(), torch.ones_like(loss)])
        steps += 1
        if steps % 10 == 0 or steps == steps_per_epoch:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.4g}")
    if steps != steps_per_epoch:
        raise RuntimeError(f"rank {dist.rank()}: epoch {epoch} ended after {steps} of {steps_per_epoch} steps")
    total_loss, count = dist.all_reduce_sum(sums).tolist()
    return total_loss / count


def evaluate(model: nn.Module, urls: str, accelerator: Accelerator, *, image_size: int, batch_size: int,
             num_workers: int) -> dict[str, float]:
    """Top-1 / top-5 (percent) and the number of images over every rank's share of the shards ``urls``."""
    loader = build_eval_loader(urls, image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                               rank=dist.rank(), world_size=dist.world_size())
    logits, labels = extract_features(model, loader, accelerator, normalized=False, desc="validation")
    counts = torch.tensor([*topk_correct(logits, labels), len(labels)], device=accelerator.device)
    *correct, seen = dist.all_reduce_sum(counts).tolist()
    return {**{f"top{k}": 100.0 * c / seen for k, c in zip(TOPK, correct)}, "val_samples": seen}


def save_checkpoint(file: Path, model: nn.Module, optimizer: torch.optim.Optimizer, settings: Settings,
                    epoch: int, history: list[dict[str, float]]) -> None:
    """Written by the caller's main process only: to a temp file, then renamed."""
    tmp = file.with_name(file.name + ".tmp")
    torch.save({"settings": asdict(settings), "epoch": epoch, "history": history, "model": model.state_dict(),
                "optimizer": optimizer.state_dict()}, tmp)
    os.replace(tmp, file)


def load_checkpoint(file: Path, settings: Settings) -> dict[str, Any] | None:
    """The checkpoint in ``file`` (None if there is none); raises ValueError if it has other settings."""
    if not file.is_file():
        return None
    state = torch.load(file, map_location="cpu", weights_only=True)
    differ = {k: v for k, v in state["settings"].items() if asdict(settings).get(k) != v}
    if differ:
        raise ValueError(f"{file} was written with other settings ("
                         + ", ".join(f"{k} {v!r}, now {asdict(settings)[k]!r}" for k, v in differ.items())
                         + "); rerun with those or remove it to start over")
    return state


def finetune(model: Classifier, loader: ShardLoader, accelerator: Accelerator, settings: Settings,
             work_dir: Path) -> list[dict[str, float]]:
    """Fine-tune ``model`` (loaded on CPU) for the remaining epochs of ``settings``, resuming from
    ``work_dir/checkpoint.pt``; returns the per-epoch history (epoch, loss, last lr)."""
    file = work_dir / CHECKPOINT_NAME
    model.to(accelerator.device)  # before the optimizer loads its state: that goes to the parameters' device
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.peak_lr, momentum=settings.momentum,
                                nesterov=settings.nesterov, weight_decay=settings.weight_decay)
    state = load_checkpoint(file, settings)
    start, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["epoch"], state["history"]
        if accelerator.is_main_process:
            tqdm.write(f"resuming after epoch {start} of {settings.epochs} from {file}")
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # torch's SyncBN is CUDA-only
    prepared, optimizer = accelerator.prepare(model, optimizer)
    steps = len(loader)
    for epoch in range(start, settings.epochs):
        loader.set_epoch(epoch)
        loss = train_epoch(prepared, optimizer, loader, accelerator, settings, epoch, steps)
        lr = schedules.cosine((epoch + 1) * steps - 1, settings.epochs * steps, settings.peak_lr, 0.0)
        history.append({"epoch": epoch + 1, "loss": loss, "lr": lr})
        if accelerator.is_main_process:
            save_checkpoint(file, accelerator.unwrap_model(prepared), optimizer, settings, epoch + 1, history)
        accelerator.wait_for_everyone()
    return history
