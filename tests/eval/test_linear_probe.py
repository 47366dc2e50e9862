"""The linear probe: separable features are separated, its heads train independently."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from smog_scale.eval.linear_probe import LinearProbe, probe_accuracy, shuffled_batches, train_linear_probe


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four linearly separable classes on an offset, badly scaled 16-d space (BN has work to do)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=gen)
    feats = 4.0 * F.one_hot(labels, 16).float() + 0.5 * torch.randn(n, 16, generator=gen)
    return 30.0 + feats * torch.linspace(0.2, 5.0, 16), labels


def test_linear_probe_separates_separable_features_and_heads_train_independently():
    accelerator = Accelerator(cpu=True)
    train, train_labels = separable(400, seed=0)
    val, val_labels = separable(200, seed=1)

    def epoch_batches(epoch):
        return shuffled_batches(train, train_labels, 50, epoch)

    torch.manual_seed(0)
    probe = LinearProbe(16, 4, num_heads=2)
    alone = LinearProbe(16, 4, num_heads=1)
    alone.heads[0].load_state_dict(probe.heads[0].state_dict())
    for p, lrs in ((probe, [0.1, 1.0]), (alone, [0.1])):
        train_linear_probe(p, accelerator, epoch_batches, epochs=6, steps_per_epoch=8, lrs=lrs)
    results = probe_accuracy(probe, val, val_labels, chunk=64)
    assert min(r["top1"] for r in results) >= 99.0 and all(r["top5"] == 100.0 for r in results)
    for a, b in zip(probe.heads[0].parameters(), alone.heads[0].parameters()):
        torch.testing.assert_close(a, b)  # the same ops on the same numbers (see LinearProbe): defaults


def test_linear_probe_rejects_short_epochs():
    probe, one_batch = LinearProbe(4, 2), (torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    with pytest.raises(RuntimeError, match="ended after 1 of 3 steps"):
        train_linear_probe(probe, Accelerator(cpu=True), lambda epoch: [one_batch],
                           epochs=1, steps_per_epoch=3, lrs=[0.1])
