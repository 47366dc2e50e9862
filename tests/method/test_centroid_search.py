"""Tests for smog_scale.method.centroid_search: where k-means' nearest-centroid searches run, with and without
faiss, and the one faiss GPU resources object per process."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

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
    assert torch.equal(nearest_sample_rows(sample, x, seed=0)[1], (x @ sample.T).argmax(dim=1))
    result = fit(x, 10, iters=5)
    assert result.centroids.shape == (10, 16) and int(result.sizes.sum()) == 600
    assert centroid_search.backend() == "torch" and centroid_search.describe() == "torch (no faiss installed)"


class _FakeGpuFaiss(SimpleNamespace):
    """faiss-gpu's names that the search touches, recording the resources objects made."""

    def __init__(self) -> None:
        super().__init__(made=[], __version__="0.0")

    def GpuIndexFlatIP(self, *_args: object) -> None:  # noqa: N802  (faiss's name)
        raise AssertionError("not searched here")

    def StandardGpuResources(self) -> SimpleNamespace:  # noqa: N802
        resources = SimpleNamespace(temp_memory=None)
        resources.setTempMemory = lambda size: setattr(resources, "temp_memory", size)
        self.made.append(resources)
        return resources


def test_one_gpu_resources_object_per_process_with_its_temporary_memory_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every search of a process (two per re-grouping, one per Lloyd run) shares one StandardGpuResources,
    whose temporary memory is set to what tools/memory.py counts instead of faiss's default (up to 1.5 GiB)."""
    fake = _FakeGpuFaiss()
    monkeypatch.setattr(centroid_search, "faiss", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    centroid_search.gpu_resources.cache_clear()
    try:
        assert centroid_search.backend() == "faiss-gpu" and centroid_search.describe().startswith("faiss-gpu")
        with FakeTensorMode(shape_env=ShapeEnv()):
            x = torch.zeros(64, 8, device="cuda")  # fake: shapes and devices only
            searches = [NearestCentroid(x) for _ in range(3)]
        assert len(fake.made) == 1 and all(s.gpu is fake.made[0] for s in searches)
        assert fake.made[0].temp_memory == centroid_search.FAISS_TEMP_MEMORY_BYTES
    finally:
        centroid_search.gpu_resources.cache_clear()
