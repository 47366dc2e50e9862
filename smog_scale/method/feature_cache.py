"""Per-rank FIFO cache of detached features for periodic re-grouping (docs/method.md step 6).

Each rank keeps its own cache, its share of ``grouping.cache_size`` (the union, which k-means clusters).
The write pointer and the fill level are device tensors so a push never syncs with the host, and a push guarded by a
device-side ``ok`` flag writes nothing when the step was not finite.
"""

from __future__ import annotations

import torch


class FeatureCache(torch.nn.Module):
    """Ring buffer of ``capacity`` rows of ``dim`` features plus the sample id of each row."""

    feats: torch.Tensor  # the buffers registered below, declared for the type checker
    ids: torch.Tensor
    ptr: torch.Tensor
    filled: torch.Tensor

    def __init__(self, capacity: int, dim: int) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"cache capacity must be positive, got {capacity}")
        self.register_buffer("feats", torch.zeros(capacity, dim))
        self.register_buffer("ids", torch.full((capacity,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def capacity(self) -> int:
        return self.feats.shape[0]

    @torch.no_grad()
    def push(self, feats: torch.Tensor, ids: torch.Tensor | None = None, ok: torch.Tensor | None = None) -> None:
        """Append ``feats`` [B, D] (and ``ids`` [B]); the oldest rows are overwritten when full.

        With ``ok`` (0-dim bool tensor) false, nothing changes. A batch larger than the capacity
        keeps only its last ``capacity`` rows.
        """
        if feats.ndim != 2 or feats.shape[1] != self.feats.shape[1]:
            raise ValueError(f"cache holds dimension {self.feats.shape[1]}, got features {tuple(feats.shape)}")
        feats = feats.detach()[-self.capacity :].to(self.feats.dtype)
        if ids is None:
            ids = torch.full((feats.shape[0],), -1, dtype=torch.long, device=feats.device)
        ids = ids[-self.capacity :]
        if ok is None:
            ok = torch.ones((), dtype=torch.bool, device=feats.device)
        rows = (self.ptr + torch.arange(feats.shape[0], device=feats.device)) % self.capacity
        self.feats.index_copy_(0, rows, torch.where(ok, feats, self.feats[rows]))
        self.ids.index_copy_(0, rows, torch.where(ok, ids, self.ids[rows]))
        step = ok.long() * feats.shape[0]
        self.ptr.copy_((self.ptr + step) % self.capacity)
        self.filled.copy_(torch.clamp(self.filled + step, max=self.capacity))

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled rows (features [N, D], ids [N]), oldest first; reads the fill level on the host."""
        return self.newest(int(self.filled))

    def newest(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The newest ``rows`` rows (features [rows, D], ids [rows]), oldest first, without a host read."""
        order = (self.ptr - rows + torch.arange(rows, device=self.feats.device)) % self.capacity
        return self.feats[order], self.ids[order]
