"""The benchmark's SimCLR reference (benchmarks/simclr_reference.py): NT-Xent against a plain per-view loop, batches."""

from __future__ import annotations

import math
import random
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

from simclr_reference import epoch_batches, nt_xent  # noqa: E402


def plain_nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent written out view by view (Chen et al. 2020, eq. 1), averaged over the 2B views."""
    views = [F.normalize(v, dim=0) for v in torch.cat([z[0], z[1]])]
    batch = z.shape[1]
    total = 0.0
    for i, anchor in enumerate(views):
        positive = (i + batch) % (2 * batch)
        denominator = sum(math.exp(float(anchor @ other) / temperature) for k, other in enumerate(views) if k != i)
        total += -math.log(math.exp(float(anchor @ views[positive]) / temperature) / denominator)
    return torch.tensor(total / (2 * batch))


@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_nt_xent_matches_the_plain_loop(temperature: float) -> None:
    z = torch.randn(2, 6, 5, dtype=torch.float64)
    assert nt_xent(z, temperature).item() == pytest.approx(plain_nt_xent(z, temperature).item(), rel=1e-5)


def test_nt_xent_is_lower_when_the_views_agree() -> None:
    z = torch.randn(2, 8, 16)
    aligned = torch.stack([z[0], z[0] + 0.01 * torch.randn(8, 16)])
    assert nt_xent(aligned).item() < nt_xent(z).item()


def test_nt_xent_refuses_more_than_two_views() -> None:
    with pytest.raises(ValueError, match="exactly 2 views"):
        nt_xent(torch.randn(3, 4, 8))


def test_epoch_batches_draw_without_replacement() -> None:
    batches = epoch_batches(1437, 128, random.Random(0))
    drawn = [i for batch in batches for i in batch]
    assert len(batches) == 11 and all(len(batch) == 128 for batch in batches)
    assert len(set(drawn)) == len(drawn) and set(drawn) <= set(range(1437))  # no image twice in an epoch
    assert epoch_batches(1437, 128, random.Random(0)) == batches != epoch_batches(1437, 128, random.Random(1))
