"""Features of labelled images, this rank's share: what kNN, the linear probe and group quality start from.

Every function runs in one process and under Accelerate with several. Each rank extracts the
features of its own share of the shards (``shards.build_eval_loader`` splits them by rank); what
needs every sample is gathered through ``dist`` by the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from smog_scale import dist
from smog_scale.data.shards import build_eval_loader


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



def shard_features(model: nn.Module, urls: str, accelerator: Accelerator, *, image_size: int, batch_size: int,
                   num_workers: int, desc: str, normalized: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_features` over this rank's share of the shards ``urls`` (center crops)."""
    loader = build_eval_loader(urls, image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                               rank=dist.rank(), world_size=dist.world_size())
    return extract_features(model, loader, accelerator, normalized=normalized, desc=desc)
