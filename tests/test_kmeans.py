"""Tests for smog_scale.kmeans: spherical k-means over the union of all ranks' caches (docs/method.md
"Periodic re-grouping", step 1)."""

from __future__ import annotations

import math

import faiss
import pytest
import torch
import torch.nn.functional as F
from gloo import run_on_ranks

from smog_scale import dist
from smog_scale import kmeans as kmeans_module
from smog_scale.kmeans import fit, kmeans

DIM, K = 32, 30
RANK_ROWS = (1700, 1300)  # two ranks with different cache sizes; 3000 rows in the union


def blobs(rows: int, dim: int = DIM, num_blobs: int = K, seed: int = 0) -> torch.Tensor:
    """rows x dim unit vectors around ``num_blobs`` random directions.

    Separated enough that every good initialization ends in the same optimum, so results of different
    runs can be compared to 2%; random initialization still gets stuck in worse local optima.
    """
    generator = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(num_blobs, dim, generator=generator), dim=1)
    blob = torch.randint(num_blobs, (rows,), generator=generator)
    noise = 0.6 * torch.randn(rows, dim, generator=generator) / math.sqrt(dim)
    return F.normalize(directions[blob] + noise, dim=1)


def duplicates(distinct: int, copies: int, seed: int = 0) -> torch.Tensor:
    """``distinct`` random unit rows, each repeated ``copies`` times."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(distinct, DIM, generator=generator), dim=1).repeat(copies, 1)


def faiss_mean_distance(x: torch.Tensor, k: int) -> float:
    """Mean cosine distance to the nearest centroid after faiss's own spherical k-means (20 iterations)."""
    model = faiss.Kmeans(x.shape[1], k, niter=20, spherical=True, seed=0)
    model.train(x.numpy())
    sims, _ = model.index.search(x.numpy(), 1)
    return 1.0 - float(sims.mean())


def test_centroids_are_unit_norm_and_statistics_describe_them() -> None:
    x = blobs(3000)
    result = fit(x, K)
    assert result.centroids.shape == (K, DIM) and result.centroids.dtype == torch.float32
    torch.testing.assert_close(result.centroids.norm(dim=1), torch.ones(K))
    sims, labels = (x @ result.centroids.T).max(dim=1)
    assert torch.equal(result.sizes, torch.bincount(labels, minlength=K))
    assert result.sizes.min() > 0
    assert result.mean_distance == pytest.approx(1 - sims.double().mean().item(), abs=1e-6)
    assert 0 < result.iterations <= 20
    assert torch.equal(kmeans(x, K), result.centroids)


def test_rows_are_normalized_before_clustering() -> None:
    x = blobs(2000)
    scales = torch.linspace(0.1, 10.0, len(x))[:, None]
    torch.testing.assert_close(fit(x * scales, K).centroids, fit(x, K).centroids)


def test_same_seed_gives_same_centroids() -> None:
    x = blobs(3000)
    assert torch.equal(fit(x, K, seed=3).centroids, fit(x, K, seed=3).centroids)
    assert not torch.equal(fit(x, K, seed=3).centroids, fit(x, K, seed=4).centroids)


def test_sharded_equals_gather_in_one_process() -> None:
    x = blobs(3000)
    assert torch.equal(fit(x, K, mode="sharded").centroids, fit(x, K, mode="gather").centroids)


def test_quality_matches_faiss_and_greedy_init_beats_random() -> None:
    x = blobs(3000)
    greedy = fit(x, K).mean_distance
    assert greedy <= 1.02 * faiss_mean_distance(x, K)
    assert greedy < fit(x, K, init="random").mean_distance


@pytest.mark.parametrize("k", [7, 300, 3000])
def test_nearest_centroid_search_matches_a_plain_matmul(k: int) -> None:
    generator = torch.Generator().manual_seed(k)
    x = F.normalize(torch.randn(5000, 64, generator=generator), dim=1)
    centroids = F.normalize(torch.randn(k, 64, generator=generator), dim=1)
    sims, labels = kmeans_module._NearestCentroid(x)(centroids)
    reference_sims, reference_labels = (x @ centroids.T).max(dim=1)
    assert torch.equal(labels, reference_labels)
    torch.testing.assert_close(sims, reference_sims, rtol=1e-5, atol=1e-6)


def test_seeding_without_room_for_the_gram_matrix_picks_the_same_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    x = blobs(3000)
    with_gram = fit(x, K, iters=0)
    monkeypatch.setattr(kmeans_module, "_GRAM_BYTES", 0)  # every step multiplies its candidates instead
    assert torch.equal(fit(x, K, iters=0).centroids, with_gram.centroids)


def test_duplicate_rows_leave_no_empty_cluster() -> None:
    x = duplicates(distinct=40, copies=50)
    # Random seeds drawn from duplicates coincide, so clusters start empty and must be re-seeded.
    exact = fit(x, 40, init="random")
    assert exact.num_reseeded > 0
    assert torch.equal(exact.sizes, torch.full((40,), 50))
    assert exact.mean_distance < 1e-6
    fewer = fit(x, 25, init="random")
    assert fewer.num_reseeded > 0 and fewer.sizes.min() > 0


def test_fewer_distinct_rows_than_k_raises() -> None:
    with pytest.raises(ValueError, match=r"of k=12 clusters stayed empty.*fewer than 12 distinct rows"):
        fit(duplicates(distinct=10, copies=20), 12)


def test_k_above_union_rows_raises_naming_both() -> None:
    with pytest.raises(ValueError, match=r"k=11 clusters exceed the 10 rows"):
        fit(blobs(10), 11)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_raises(bad: float) -> None:
    x = blobs(500)
    x[7, 3] = bad
    with pytest.raises(ValueError, match=r"1 non-finite values in the union of 500 rows"):
        fit(x, K)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"mode": "all"}, "mode must be"), ({"init": "kmeans"}, "init must be"), ({"k": 0}, "k >= 1")],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit(blobs(100), **{"k": K, **kwargs})


def test_non_matrix_input_raises() -> None:
    with pytest.raises(ValueError, match=r"N x D feature matrix, got shape \(32,\)"):
        fit(blobs(100)[0], K)


def _cluster_on_two_ranks(rank: int, world: int) -> dict:
    """Each rank clusters its own slice of the same union in both modes (and two edge cases)."""
    start = sum(RANK_ROWS[:rank])
    mine = blobs(sum(RANK_ROWS))[start : start + RANK_ROWS[rank]]
    out: dict = {}
    for mode in ("gather", "sharded"):
        result = fit(mine, K, mode=mode, init_sample=1000)  # seeds from a sample, not the whole union
        out[mode] = {"centroids": result.centroids, "sizes": result.sizes, "distance": result.mean_distance}
        # Only rank 1 holds rows: rank 0's cache may still be empty early in training.
        lopsided = fit(mine if rank == 1 else mine[:0], K, mode=mode)
        out[f"{mode}_lopsided"] = {"centroids": lopsided.centroids, "sizes": lopsided.sizes}
    out["gathered"] = dist.gather_cat(mine)  # what gather mode clusters: the union on rank 0 alone
    dup = fit(duplicates(distinct=40, copies=25, seed=rank), 80, mode="sharded", init="random")
    out["duplicates"] = {"sizes": dup.sizes, "reseeded": dup.num_reseeded}
    try:
        fit(mine, sum(RANK_ROWS) + 1, mode="sharded")
    except ValueError as error:
        out["too_many"] = str(error)
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_on_ranks(_cluster_on_two_ranks, 2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["gather", "sharded"])
def test_two_ranks_end_with_identical_centroids(two_ranks: list[dict], mode: str) -> None:
    for case in (mode, f"{mode}_lopsided"):
        first, second = two_ranks[0][case], two_ranks[1][case]
        assert torch.equal(first["centroids"], second["centroids"])
        assert torch.equal(first["sizes"], second["sizes"])
        assert first["sizes"].min() > 0
    assert two_ranks[0][mode]["sizes"].sum() == sum(RANK_ROWS)
    assert two_ranks[0][f"{mode}_lopsided"]["sizes"].sum() == RANK_ROWS[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["gather", "sharded"])
def test_two_ranks_match_one_process_on_the_union(two_ranks: list[dict], mode: str) -> None:
    union = blobs(sum(RANK_ROWS))
    distance = two_ranks[0][mode]["distance"]
    sims = (union @ two_ranks[0][mode]["centroids"].T).max(dim=1).values
    assert distance == pytest.approx(1 - sims.double().mean().item(), abs=1e-6)
    assert distance == pytest.approx(fit(union, K).mean_distance, rel=0.02)
    assert distance <= 1.02 * faiss_mean_distance(union, K)


@pytest.mark.slow
def test_gather_mode_holds_the_union_on_rank_0_alone(two_ranks: list[dict]) -> None:
    assert torch.equal(two_ranks[0]["gathered"], blobs(sum(RANK_ROWS)))  # rank order, padding removed
    assert two_ranks[1]["gathered"] is None


@pytest.mark.slow
def test_two_ranks_reseed_empty_clusters_and_raise_together(two_ranks: list[dict]) -> None:
    for result in two_ranks:
        # 80 distinct rows over both ranks (40 each), 80 clusters: only one row per cluster fits.
        assert torch.equal(result["duplicates"]["sizes"], torch.full((80,), 25))
        assert result["duplicates"]["reseeded"] > 0
        total = sum(RANK_ROWS)
        assert result["too_many"].startswith(f"k={total + 1} clusters exceed the {total} rows")
