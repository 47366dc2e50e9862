"""Tests for smog_scale.method.centroid_search: where k-means' nearest-centroid searches run, with and without
faiss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smog_scale.method import centroid_search
from smog_scale.method.centroid_search import NearestCentroid, nearest_sample_rows
from smog_scale.method.kmeans import fit
from tests.helpers import assert_argmax_up_to_rounding, summation_atol


@pytest.mark.parametrize("k", [7, 300, 3000])
def test_nearest_centroid_search_matches_a_plain_matmul(k: int) -> None:
    generator = torch.Generator().manual_seed(k)
    x = F.normalize(torch.randn(5000, 64, generator=generator), dim=1)
    centroids = F.normalize(torch.randn(k, 64, generator=generator), dim=1)
    sims, labels = NearestCentroid(x)(centroids)
    exact = x.double() @ centroids.double().T
    atol = summation_atol(torch.float32, 64)  # a float32 similarity of unit rows adds 64 products
    assert_argmax_up_to_rounding(labels, exact, atol)
    torch.testing.assert_close(sims.double(), exact.max(dim=1).values, rtol=0, atol=atol)


def test_without_faiss_k_means_runs_on_torch_with_exact_seeding_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """An install with neither faiss extra: the searches are torch's, the sample's nearest rows exact."""
    monkeypatch.setattr(centroid_search, "faiss", None)
    generator = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(600, 16, generator=generator), dim=1)
    sample = x[:100]
    assert torch.equal(nearest_sample_rows(sample, x, seed=0), (x @ sample.T).argmax(dim=1))
    result = fit(x, 10, iters=5)
    assert result.centroids.shape == (10, 16) and int(result.sizes.sum()) == 600
    assert centroid_search.backend() == "torch" and centroid_search.describe() == "torch (no faiss installed)"
