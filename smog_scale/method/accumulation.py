"""What one optimizer step gathers over its micro-batches before it commits.

docs/method.md, "Gradient accumulation". With A micro-batches per optimizer step, every micro-batch takes
its labels and assignments from the same G, because nothing is committed before the step ends. The step
then commits G once, from the per-group sums and counts of all its micro-batches over all ranks (the
global batch) with the step's beta, and only then pushes the micro-batches' features into the cache. A
skipped step (non-finite values, or an fp16 overflow that made the optimizer skip) commits and pushes
nothing, and puts back the model's buffers (BatchNorm statistics) that its forwards moved.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from smog_scale.method.feature_cache import FeatureCache
from smog_scale.method.grouping import GroupBank, GroupStatistics, Update, merge_statistics, updated_groups


class StepAccumulator:
    """The global batch's group statistics over the micro-batches seen so far (``stats``: sums [K, D] in
    float32, counts [K], the random picks; None under the BYOL objective), the cache rows waiting for the
    commit, the summed loss, whether any micro-batch was non-finite on some rank, and the model's buffers as
    they were before the step's first forward."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stats: GroupStatistics | None = None
        self.loss = torch.zeros((), device=device)
        self.health = torch.zeros(2, device=device)  # summed [label agreement, prediction hit rate]
        self.micro_batches = 0
        self.nonfinite = False
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, its copy)

    def start(self, buffers: Iterable[torch.Tensor]) -> None:
        """Before the step's first forward: copy the model's ``buffers`` so that a skipped step restores them."""
        self.buffers = [(b, b.clone()) for b in buffers]

    def add(self, loss: torch.Tensor, nonfinite: bool, stats: GroupStatistics | None = None,
            rows: tuple[torch.Tensor, torch.Tensor] | None = None, health: torch.Tensor | None = None) -> None:
        """One micro-batch: its loss (0-dim), whether it was non-finite on any rank (a host bool every rank
        shares), and for SMoG its global statistics, cache rows (features [N, D], ids [N]) and health [2]."""
        self.loss += loss.detach().float()
        if health is not None:
            self.health += health
        self.micro_batches += 1
        self.nonfinite |= nonfinite
        if stats is not None:
            detached = stats._replace(**{name: t.detach() for name, t in stats._asdict().items() if t is not None})
            detached = detached._replace(sums=detached.sums.float())
            self.stats = detached if self.stats is None else merge_statistics(self.stats, detached)
        if rows is not None:
            self.rows.append((rows[0].detach(), rows[1]))

    def mean_loss(self) -> torch.Tensor:
        """The step's loss: the mean over its micro-batches (0-dim, on the device)."""
        return self.loss / max(self.micro_batches, 1)

    def mean_health(self) -> torch.Tensor:
        """The step's [label agreement, prediction hit rate] on this rank: means over its micro-batches (equal
        sizes, so the shares of the rank's whole batch)."""
        return self.health / max(self.micro_batches, 1)

    def commit(self, bank: GroupBank, cache: FeatureCache, beta: float, update: Update = "momentum") -> None:
        """docs/method.md steps 5-6 for the whole step: G <- normalize(g') from the summed statistics by the rule
        ``update``, then the cache pushes in micro-batch order; the accumulator is emptied for the next step."""
        if self.stats is not None:
            bank.commit(updated_groups(bank.groups, self.stats, beta, update, bank.updates), counts=self.stats.counts)
        for feats, ids in self.rows:
            cache.push(feats, ids)
        self.clear()

    def discard(self) -> None:
        """Forget the step (skipped): G and the cache stay as they were, the buffers go back."""
        with torch.no_grad():
            for buffer, copy in self.buffers:
                buffer.copy_(copy)
        self.clear()

    def clear(self) -> None:
        """Empty the accumulator for the next step."""
        self.stats = None
        self.loss.zero_()
        self.health.zero_()
        self.micro_batches = 0
        self.nonfinite = False
        self.rows.clear()
        self.buffers = []
