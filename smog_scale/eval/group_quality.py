"""Group quality: the per-group class entropy of labelled samples assigned to a checkpoint's groups.

The paper's Fig. 5 (docs/method.md "Grouping health")."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from smog_scale import dist
from smog_scale.eval.features import extract_features
from smog_scale.method.grouping import assign
from smog_scale.method.health import group_entropy


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
