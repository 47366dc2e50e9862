"""Feature extraction, weighted kNN, linear probe and group quality: shared by the training monitor and tools/.

Every function runs in one process and under Accelerate with several. Each rank extracts the
features of its own share of the shards (``shards.build_eval_loader`` splits them by rank); what
needs every sample is gathered through ``dist``:

- kNN (InstDisc / DINO): the validation features are gathered to every rank, each rank searches its
  own training features in blocks (never a val x train matrix) and the ranks' candidates are merged,
  so no rank ever holds the 1.28M ImageNet training features of the others.
- Linear probe (MoCo v3 / DINO protocol): frozen backbone, BN without affine, one linear head per
  learning rate, SGD with momentum and a cosine schedule; gradients are averaged by DDP.
- Group quality (the paper's Fig. 5, docs/method.md "Grouping health"): per-group class entropy of
  labelled samples assigned to the checkpoint's groups.

Accuracies are percentages.
"""

from __future__ import annotations

import math
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
from smog_scale.data.shards import build_eval_loader
from smog_scale.method import schedules
from smog_scale.method.grouping import assign
from smog_scale.training.metrics import group_entropy

KNN_K = 20  # neighbours (InstDisc, DINO)
KNN_TEMPERATURE = 0.07  # vote weights exp(cos / T) (InstDisc, DINO)
TOPK = (1, 5)
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (features [B, D], labels [B]) on the device


@torch.no_grad()
def extract_features(model: nn.Module, batches: Iterable[Sequence[Any]], accelerator: Accelerator, *,
                     normalized: bool = True, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's features [N_r, D] (float32, L2-normalized unless ``normalized=False``) and labels [N_r].

    ``batches`` yields ``(images [B, 3, S, S] normalized float, labels [B], ...)`` as
    ``shards.build_eval_loader`` does. ``model`` runs in eval mode under the accelerator's autocast
    and gets its mode back. A collective: the ranks agree on D, so a rank without batches returns [0, D].
    """
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for images, cls, *_ in tqdm(batches, desc=desc, unit="batch", disable=not accelerator.is_main_process,
                                dynamic_ncols=True):
        with accelerator.autocast():
            out = model(images.to(accelerator.device, non_blocking=True)).float()
        feats.append(F.normalize(out, dim=1) if normalized else out)
        labels.append(cls.to(accelerator.device))
    model.train(was_training)
    dim = int(dist.all_gather_cat(torch.tensor([feats[0].shape[1] if feats else -1], device=accelerator.device)).max())
    if dim < 0:
        raise ValueError(f"{desc}: no rank read any sample; are the shards empty?")
    if not feats:
        device = accelerator.device
        return torch.empty(0, dim, device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, images: Iterable[torch.Tensor]) -> int:
    """Replace the running statistics of every BatchNorm layer of ``model`` by their plain average over the
    batches of ``images`` (normalized [B, 3, S, S], on the model's device); no weight changes. Returns the
    number of batches. The model is left in eval mode.

    A backbone's eval-mode features depend on these statistics as much as on its weights: a timm backbone at
    random init has running mean 0 and variance 1 (its BatchNorm an affine no-op in eval mode), while any
    trained backbone carries statistics of the data. Re-estimating them on random weights gives the baseline
    that separates what training learned from what the statistics alone change (benchmarks/README.md,
    "Learning on small data").
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    model.eval()  # dropout and drop path off: only the statistics may differ from the evaluated network
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches
        layer.train()
    count = 0
    for batch in images:
        model(batch)
        count += 1
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    model.eval()
    if count == 0:
        raise ValueError("BatchNorm re-estimation read no batch")
    return count


def shard_features(model: nn.Module, urls: str, accelerator: Accelerator, *, image_size: int, batch_size: int,
                   num_workers: int, desc: str, normalized: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_features` over this rank's share of the shards ``urls`` (center crops)."""
    loader = build_eval_loader(urls, image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                               rank=dist.rank(), world_size=dist.world_size())
    return extract_features(model, loader, accelerator, normalized=normalized, desc=desc)


def _best_k(sims: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    best, index = sims.topk(k, dim=1)
    return best, labels.gather(1, index)


def knn_neighbors(train_feats: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, k: int = KNN_K, *,
                  query_chunk: int = 1024, train_chunk: int = 32768) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities [M, k] and labels [M, k] of the k nearest training features of ``queries`` [M, D].

    Every rank searches its own unit-norm ``train_feats`` [N_r, D] in blocks of ``query_chunk`` x
    ``train_chunk`` similarities, then the ranks' candidates are all-gathered and the best k kept, so
    all ranks must pass the same queries. With fewer than k training features the missing neighbours
    have similarity -inf (vote weight 0).
    """
    found_sims, found_labels = [], []
    for query in queries.split(query_chunk):
        best = query.new_full((len(query), k), -math.inf)
        best_labels = train_labels.new_zeros((len(query), k))
        for start in range(0, len(train_feats), train_chunk):
            block = query @ train_feats[start:start + train_chunk].t()
            sims, index = block.topk(min(k, block.shape[1]), dim=1)
            best, best_labels = _best_k(torch.cat([best, sims], 1),
                                        torch.cat([best_labels, train_labels[start + index]], 1), k)
        found_sims.append(best)
        found_labels.append(best_labels)
    sims, labels = torch.cat(found_sims), torch.cat(found_labels)
    if dist.world_size() > 1:  # [W * M, k] in rank order -> [M, W * k] -> best k
        def per_query(t: torch.Tensor) -> torch.Tensor:
            return dist.all_gather_cat(t).view(dist.world_size(), -1, k).transpose(0, 1).flatten(1)
        sims, labels = _best_k(per_query(sims), per_query(labels), k)
    return sims, labels


def knn_vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int,
             temperature: float = KNN_TEMPERATURE) -> torch.Tensor:
    """Class scores [M, C]: for each class, the sum of exp(sim / T) over the neighbours of that class."""
    scores = torch.zeros(len(sims), num_classes, device=sims.device)
    return scores.scatter_add_(1, labels, (sims / temperature).exp())


def topk_correct(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = TOPK) -> list[int]:
    """For each k, the rows whose target is among their k best scores (k capped at the number of classes)."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == targets[:, None]
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


def knn_evaluate(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, *, k: int = KNN_K, temperature: float = KNN_TEMPERATURE,
                 num_classes: int | None = None, **chunks: int) -> dict[str, float]:
    """Weighted kNN top-1 / top-5 (percent) of every rank's validation features against every rank's
    training features; each rank passes its own (unit-norm) shares. The same result on every rank."""
    queries, targets = dist.all_gather_cat(val_feats), dist.all_gather_cat(val_labels)
    if len(queries) == 0:
        raise ValueError("kNN: no validation features")
    if num_classes is None:
        local_max = torch.cat([train_labels, targets]).max().view(1)
        num_classes = 1 + int(dist.all_gather_cat(local_max).max())
    sims, labels = knn_neighbors(train_feats, train_labels, queries, k, **chunks)
    correct = topk_correct(knn_vote(sims, labels, num_classes, temperature), targets)
    return {f"knn_top{j}": 100.0 * c / len(targets) for j, c in zip(TOPK, correct)}


def knn_monitor(accelerator: Accelerator, backbone: nn.Module, train_loader: Iterable[Sequence[Any]],
                val_loader: Iterable[Sequence[Any]], *, k: int = KNN_K,
                temperature: float = KNN_TEMPERATURE) -> dict[str, float]:
    """{"knn_top1", "knn_top5"} (percent) of ``backbone`` for the training monitor; a collective.

    The loaders are ``shards.build_eval_loader``s of held-out labelled shards built with this rank's
    rank / world size. ``backbone`` (e.g. the unwrapped model's ``online.backbone``) is switched to eval
    mode for the extraction and back to its previous mode.
    """
    train = extract_features(backbone, train_loader, accelerator, desc="knn monitor: train")
    val = extract_features(backbone, val_loader, accelerator, desc="knn monitor: val")
    return knn_evaluate(*train, *val, k=k, temperature=temperature)


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


def group_assignments(encoder: nn.Module, groups: torch.Tensor, batches: Iterable[Sequence[Any]],
                      accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Group index (argmax cosine to ``groups`` [K, D]) and label of every rank's samples, on CPU.

    ``encoder`` maps images to projector features (``SMoGModel.momentum`` or ``.online``).
    """
    feats, labels = extract_features(encoder, batches, accelerator, desc="group assignment")
    assignments = assign(groups.to(feats.device), feats)
    return dist.all_gather_cat(assignments).cpu(), dist.all_gather_cat(labels).cpu()


def group_quality(assignments: torch.Tensor, labels: torch.Tensor, num_groups: int, num_classes: int,
                  seed: int = 0) -> dict[str, Any]:
    """The paper's Fig. 5 numbers: per-group class entropy sum_c -p_c log p_c (nats; lower is better).

    Means are over non-empty groups, plain and weighted by group size. ``chance_*`` repeat them with
    the labels shuffled over the samples (same group sizes): what a grouping blind to the classes
    scores, since small groups have low entropy whatever they contain.
    """
    sizes = torch.bincount(assignments, minlength=num_groups)
    used = sizes > 0
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    summary: dict[str, Any] = {"num_samples": len(labels), "num_groups": num_groups, "num_classes": num_classes,
                               "non_empty_groups": int(used.sum()), "max_entropy": math.log(num_classes)}
    per_group = {}
    for name, classes in (("", labels), ("chance_", shuffled)):
        entropy = group_entropy(assignments, classes, num_groups, num_classes)
        summary[f"{name}mean_entropy"] = float(entropy[used].mean())
        summary[f"{name}weighted_mean_entropy"] = float((entropy * sizes).sum() / sizes.sum())
        per_group[f"{name}group_entropy"] = [round(float(e), 6) + 0.0 if u else None for e, u in zip(entropy, used)]
    return {**summary, "group_sizes": sizes.tolist(), **per_group}
