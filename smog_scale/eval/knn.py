"""Weighted kNN (InstDisc / DINO) over every rank's features: the training monitor's and ``tools/knn_eval.py``'s.

The validation features are gathered to every rank, each rank searches its own training features in
blocks (never a val x train matrix) and the ranks' candidates are merged, so no rank ever holds the
1.28M ImageNet training features of the others. Accuracies are percentages.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from smog_scale import dist
from smog_scale.eval.accuracy import TOPK, topk_correct
from smog_scale.eval.features import extract_features

KNN_K = 20  # neighbours (InstDisc, DINO)

KNN_TEMPERATURE = 0.07  # vote weights exp(cos / T) (InstDisc, DINO)



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
