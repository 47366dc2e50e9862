"""The grouping health signals (docs/method.md "Grouping health") against plain references."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from smog_scale.method.health import label_churn
from smog_scale.method.objectives import grouping_health
from tests.helpers import EPS32


def reference_health(preds, labels, groups):
    """Loops over samples and pairs: label agreement over pairs of distinct global views, prediction hits over
    the loss's (view, target) pairs."""
    num_views, batch, _ = preds.shape
    num_global = labels.shape[0]
    unit = F.normalize(groups, dim=1)
    agree, pairs, hits, hit_pairs = 0, 0, 0, 0
    for b in range(batch):
        for v in range(num_views):
            predicted = int((unit @ F.normalize(preds[v, b], dim=0)).argmax())
            for t in range(num_global):
                if v == t:
                    continue
                hits += predicted == int(labels[t, b])
                hit_pairs += 1
                if v < num_global:
                    agree += int(labels[v, b]) == int(labels[t, b])
                    pairs += 1
    return torch.tensor([agree / pairs, hits / hit_pairs])


@pytest.mark.parametrize("num_local", [0, 2])
def test_grouping_health_matches_loop_reference(num_local):
    gen = torch.Generator().manual_seed(num_local)
    groups = torch.randn(5, 8, generator=gen)
    preds = torch.randn(3 + num_local, 40, 8, generator=gen)
    labels = torch.randint(0, 5, (3, 40), generator=gen)  # 3 global views: pairs (a, b), (a, c), (b, c)
    labels[1, :20] = labels[0, :20]  # some agreement
    preds[1] = groups[labels[0]] + 0.1 * preds[1]  # view b predicts view a's groups: hits
    health = grouping_health(preds, labels, groups)
    assert health.dtype == torch.float32 and health.shape == (2,)
    # shares of whole counts: each side divides once or twice (float32), the argmaxes are far from ties here
    torch.testing.assert_close(health, reference_health(preds, labels, groups), rtol=4 * EPS32, atol=0)
    assert 0.2 < health[1] < 1.0


def reference_churn(old, new, k):
    """Brute force over every one-to-one relabelling of the old groups: the fewest rows that change group."""
    best = min(sum(int(perm[o] != n) for o, n in zip(old.tolist(), new.tolist()))
               for perm in itertools.permutations(range(k)))
    return best / len(old)


def test_label_churn_matches_brute_force_and_ignores_the_numbering():
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        old = torch.randint(0, 5, (60,), generator=gen)
        new = torch.randint(0, 5, (60,), generator=gen)
        new[: 12 * trial] = old[: 12 * trial]  # from unrelated labels to mostly kept ones
        assert label_churn(old, new, 5) == pytest.approx(reference_churn(old, new, 5), abs=1e-12)
    relabelled = torch.tensor([3, 0, 4, 1, 2])[old]
    assert label_churn(old, relabelled, 5) == 0.0  # k-means' own numbering is not churn
    moved = relabelled.clone()
    moved[:6] = (moved[:6] + 1) % 5
    assert label_churn(old, moved, 5) == pytest.approx(0.1)
