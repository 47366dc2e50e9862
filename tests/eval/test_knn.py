"""Weighted kNN against a brute-force reference, in one process and on two gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smog_scale.eval.knn import knn_evaluate, knn_neighbors, knn_vote
from tests.helpers import run_on_ranks, summation_atol


def clustered(n: int, num_classes: int, dim: int, seed: int, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm features around one random centre per class, and their labels."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return F.normalize(centres[labels] + noise * torch.randn(n, dim, generator=gen), dim=1), labels


def brute_force_knn(train, train_labels, val, k, temperature, num_classes):
    """The textbook weighted kNN: the full similarity matrix, top k, one-hot votes."""
    sims = val @ train.t()
    top, index = sims.topk(min(k, len(train)), dim=1)
    one_hot = F.one_hot(train_labels[index], num_classes).float()
    return (one_hot * (top / temperature).exp().unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("num_train, k", [(300, 20), (5, 20)])
def test_knn_equals_brute_force(num_train, k):
    train, train_labels = clustered(num_train, 7, 12, seed=0)
    val, val_labels = clustered(50, 7, 12, seed=1)
    expected = brute_force_knn(train, train_labels, val, k, 0.07, 7)
    sims, labels = knn_neighbors(train, train_labels, val, k, query_chunk=7, train_chunk=13)
    # a similarity (12 products of unit vectors) moves exp(s / 0.07) by its error / 0.07; a vote adds <= k terms
    rtol = summation_atol(torch.float32, 12) / 0.07 + summation_atol(torch.float32, k)
    torch.testing.assert_close(knn_vote(sims, labels, 7, 0.07), expected, rtol=rtol, atol=0)
    result = knn_evaluate(train, train_labels, val, val_labels, k=k, num_classes=7, query_chunk=7, train_chunk=13)
    ranked = expected.argsort(dim=1, descending=True)
    assert result["knn_top1"] == pytest.approx(100 * (ranked[:, 0] == val_labels).float().mean().item())
    top5 = (ranked[:, :5] == val_labels[:, None]).any(1).float().mean().item()
    assert result["knn_top5"] == pytest.approx(100 * top5)
    if num_train == 300:
        assert result["knn_top1"] > 80  # well-separated clusters


def _knn_on_ranks(rank: int, world: int, train, train_labels, val, val_labels) -> dict:
    cut_train, cut_val = [0, 170, len(train)], [0, 20, len(val)]  # uneven shares
    mine = slice(cut_train[rank], cut_train[rank + 1])
    theirs = slice(cut_val[rank], cut_val[rank + 1])
    return knn_evaluate(train[mine], train_labels[mine], val[theirs], val_labels[theirs], train_chunk=50)


@pytest.mark.slow
def test_knn_on_two_ranks_equals_one_process():
    train, train_labels = clustered(300, 7, 12, seed=0, noise=2.0)
    val, val_labels = clustered(50, 7, 12, seed=1, noise=2.0)
    expected = knn_evaluate(train, train_labels, val, val_labels)
    results = run_on_ranks(_knn_on_ranks, 2, train, train_labels, val, val_labels)
    # shares of correct images: the counts must be equal, approx only absorbs the float division
    assert results[0] == results[1] == pytest.approx(expected)
