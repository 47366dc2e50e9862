"""Spherical k-means over the union of all ranks' feature caches (docs/method.md "Periodic re-grouping" 1).

Two modes, both ending with bit-identical centroids on every rank:

- ``gather``: gather the caches on rank 0, cluster the union there, broadcast the result.
- ``sharded``: no rank holds the union. Rank 0 seeds the centroids from a summary of the union that every
  rank helps build and broadcasts them; each iteration every rank assigns its own rows to the nearest
  centroid and the per-centroid sums and counts are all-reduced (DeepCluster-v2's M-step).

Seeding is greedy k-means++ on cells of the union (:mod:`smog_scale.method.kmeans_seeding`): a sample drawn from
every rank splits the union into cells, every rank counts and sums its rows of each cell, and the
all-reduced sums give the seeding the union's cost of every row while the seeding loop stays the sample's
size.

Both run the same Lloyd loop (``gather`` runs it on rank 0 alone). The nearest-centroid search is a faiss
GPU index with faiss-gpu, torch's blocked matmul elsewhere (``smog_scale.method.centroid_search``); the loop
is written here because ``faiss.Kmeans`` cannot all-reduce between iterations and can leave a
cluster empty (it splits big clusters, which duplicate rows defeat). Here an empty cluster takes the member
farthest from its centroid in one of the clusters with the largest summed distance, until none is empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

from smog_scale import dist
from smog_scale.method import kmeans_seeding
from smog_scale.method.centroid_search import NearestCentroid

Mode = Literal["gather", "sharded"]
Init = Literal["greedy_kmeans++", "random"]

# Lloyd iterations allowed past ``iters`` to re-seed clusters that are still empty.
_MAX_REPAIR_ITERS = 10


class KMeansResult(NamedTuple):
    """One re-grouping's output and the health statistics the trainer logs (docs/method.md "Grouping health").

    Every field is identical on every rank, and the statistics describe ``centroids`` themselves.
    """

    centroids: torch.Tensor  # K x D float32, unit norm
    sizes: torch.Tensor  # K int64: rows of the union assigned to each centroid (all > 0)
    num_reseeded: int  # empty clusters re-seeded, summed over the iterations
    mean_distance: float  # mean cosine distance (1 - cos) of the union's rows to their centroid
    iterations: int  # Lloyd updates run


@dataclass(frozen=True)
class _Options:
    """:func:`fit`'s keyword arguments, passed down as one value."""

    iters: int
    tol: float
    init: Init
    init_sample: int
    init_trials: int
    seed: int


def kmeans(feats: torch.Tensor, k: int, **options: Any) -> torch.Tensor:
    """K x D unit-norm centroids of ``feats`` (N_r x D, this rank's cache); ``options`` are :func:`fit`'s."""
    return fit(feats, k, **options).centroids


def fit(
    feats: torch.Tensor,
    k: int,
    *,
    mode: Mode = "gather",
    iters: int = 20,
    tol: float = 1e-3,
    init: Init = "greedy_kmeans++",
    init_sample: int = 16384,
    init_trials: int = 24,
    seed: int = 0,
) -> KMeansResult:
    """Spherical k-means over the union of all ranks' ``feats`` (docs/method.md "Periodic re-grouping" 1).

    Args:
        feats: N_r x D rows of this rank's feature cache; ranks may hold different N_r. Rows are
            L2-normalized here. Single-process when no process group is initialized.
        k: number of centroids K; at most the number of rows in the union.
        mode: ``"gather"`` or ``"sharded"`` (see the module docstring).
        iters: most Lloyd updates (a few more only while clusters are empty).
        tol: stop early once an update lowers the mean cosine distance by at most this fraction.
        init: ``"greedy_kmeans++"`` (:func:`smog_scale.method.kmeans_seeding.greedy_kmeanspp` on cells of a sample
            of the union, :func:`smog_scale.method.kmeans_seeding.sample_cells`) or ``"random"`` rows (faiss's own
            init). On every shape of benchmarks/bench_kmeans.py (65,536 rows, K = 3,000) greedy seeding ends
            within 1% of scikit-learn's k-means++ on all rows or below it (benchmarks/README.md "k-means");
            faiss's random seeding up to 26% above it.
        init_sample: least rows of the union (drawn from every rank) whose cells seeding looks at; at least
            ``4 * k`` are drawn, half uniformly and half far from the first half. Seeding time grows with
            it; on the CPU seeding holds a cells-by-cells matrix up to 1 GiB (16,384 cells). On the
            benchmark's ``modes-k-noise1`` data (3,000 modes of Dirichlet(1) weights and 1% scattered rows,
            K = 3,000) 16,384 rows ended at a mean cosine distance of 0.0452 and 12,000 rows at 0.0453; the
            cells of a uniform sample of 16,384 rows at 0.0473, and the sampled rows themselves, weighted by
            their cells' sizes (before issue 21), at 0.0516.
        init_trials: candidates tried per greedy seeding step; seeding time grows with it. On the
            ``modes-k-noise1`` data 12 ended at 0.0453, 24 at 0.0452.
        seed: seeds the sample and the seeding; on CPU the same seed and inputs give the same centroids.

    Raises:
        ValueError: ``feats`` is not 2-D, holds non-finite values, ``k`` exceeds the rows of the union,
            or the union has fewer than ``k`` distinct rows (clusters that cannot be filled).
    """
    if mode not in ("gather", "sharded"):
        raise ValueError(f"k-means mode must be 'gather' or 'sharded', got {mode!r}")
    if init not in ("greedy_kmeans++", "random"):
        raise ValueError(f"k-means init must be 'greedy_kmeans++' or 'random', got {init!r}")
    total_rows = _checked_union_rows(feats, k)
    x = F.normalize(feats.detach().float(), dim=1).contiguous()
    options = _Options(iters, tol, init, init_sample, init_trials, seed)
    if mode == "sharded":
        result = _cluster(x, k, total_rows, options, sync=True)
        # All-reduced inputs already agree; the broadcast makes bit-identity independent of the backend.
        result = result._replace(centroids=dist.broadcast(result.centroids))
    else:
        union = dist.gather_cat(x)  # only rank 0 holds the union
        local = _cluster(union, k, total_rows, options, sync=False) if union is not None else None
        result = _broadcast_result(local, k, x)
    empty = int((result.sizes == 0).sum())
    if empty:
        raise ValueError(
            f"{empty} of k={k} clusters stayed empty after re-seeding: the union of {total_rows} rows "
            f"seems to hold fewer than {k} distinct rows"
        )
    return result


def _checked_union_rows(feats: torch.Tensor, k: int) -> int:
    """Rows in the union of all ranks' caches; every rank raises the same error on bad input."""
    if feats.dim() != 2:
        raise ValueError(f"k-means expects an N x D feature matrix, got shape {tuple(feats.shape)}")
    if k < 1:
        raise ValueError(f"k-means needs k >= 1 clusters, got k={k}")
    local = torch.stack([torch.tensor(feats.shape[0], device=feats.device), (~torch.isfinite(feats)).sum()])
    rows, nonfinite = (int(v) for v in dist.all_reduce_sum(local).tolist())
    if nonfinite:
        raise ValueError(f"k-means input holds {nonfinite} non-finite values in the union of {rows} rows")
    if k > rows:
        raise ValueError(f"k={k} clusters exceed the {rows} rows of the union of the feature caches")
    return rows


def _cluster(x: torch.Tensor, k: int, total_rows: int, options: _Options, *, sync: bool) -> KMeansResult:
    """Summarize the union in cells on every rank, seed from them on rank 0, broadcast, then run Lloyd's loop.

    ``x`` holds this rank's N_r x D unit rows.

    ``sync=True`` reduces over all ranks (``sharded``); ``sync=False`` treats ``x`` as the whole union and
    issues no collective (``gather`` on rank 0).
    """
    size = kmeans_seeding.sample_size(k, options.init_sample)
    search = NearestCentroid(x)
    generator = torch.Generator(device=x.device).manual_seed(options.seed)
    centroids = x.new_empty(k, x.shape[1])
    if options.init == "greedy_kmeans++":
        # Each rank draws its share of the sample's second half with its own stream.
        local = torch.Generator(device=x.device).manual_seed(options.seed + (dist.rank() if sync else 0))
        cells = kmeans_seeding.sample_cells(x, size, total_rows, options.seed, search, local, sync)
        if not sync or dist.rank() == 0:
            centroids = kmeans_seeding.greedy_kmeanspp(*cells, k, options.init_trials, generator)
    else:
        sample = kmeans_seeding.sample_union(x, size, total_rows, options.seed, sync)
        if not sync or dist.rank() == 0:
            centroids = sample[torch.randperm(len(sample), generator=generator, device=x.device)[:k]]
    if sync:
        dist.broadcast(centroids)
    return _lloyd(x, search, centroids, total_rows, iters=options.iters, tol=options.tol, sync=sync)


def _lloyd(
    x: torch.Tensor, search: NearestCentroid, centroids: torch.Tensor, total_rows: int, *, iters: int, tol: float,
    sync: bool,
) -> KMeansResult:
    """Lloyd's loop from ``centroids`` (K x D) over ``x`` (N_r x D unit rows) with empty-cluster re-seeding.

    Each pass assigns every row to its nearest centroid (``search``, built over ``x``), reduces the
    per-centroid sums and counts over ranks when ``sync``, and moves every centroid to its members'
    normalized mean; empty clusters are re-seeded (:func:`_reseed_rows`). It returns once ``iters``
    updates are done or ``tol`` is met and no cluster is empty, or when the repair budget is spent
    (``fit`` then raises).
    """
    num_reseeded, previous = 0, math.inf
    for iteration in range(iters + _MAX_REPAIR_ITERS + 1):
        sims, labels = search(centroids)  # N_r, N_r
        sums = _sum_over_ranks(torch.zeros_like(centroids).index_add_(0, labels, x), sync)  # K x D
        sizes = _sum_over_ranks(torch.bincount(labels, minlength=len(centroids)), sync)  # K
        mean_distance = 1 - float(_sum_over_ranks(sims.double().sum(), sync)) / total_rows
        empty = (sizes == 0).nonzero().squeeze(1)
        done = iteration >= iters or previous - mean_distance <= tol * mean_distance
        if (done and len(empty) == 0) or iteration == iters + _MAX_REPAIR_ITERS:
            return KMeansResult(centroids, sizes, num_reseeded, mean_distance, iteration)
        # Summed cosine distance of each cluster's members to its current centroid.
        cost = sizes - (sums * centroids).sum(dim=1)  # K
        centroids = F.normalize(sums, dim=1)
        if len(empty):
            centroids[empty] = _reseed_rows(x, sims, labels, cost, len(empty), sync)
            num_reseeded += len(empty)
        previous = mean_distance
    raise AssertionError("unreachable: the loop returns on its last iteration")


def _reseed_rows(
    x: torch.Tensor, sims: torch.Tensor, labels: torch.Tensor, cost: torch.Tensor, count: int, sync: bool
) -> torch.Tensor:
    """``count`` x D seeds for empty clusters, identical on every rank.

    Each seed is the member farthest from its centroid in one of the ``count`` clusters with the largest
    summed distance ``cost`` (K). Members of different clusters are different points, so duplicate rows
    never hand two empty clusters the same seed. Each rank offers its farthest member of those clusters;
    the farthest offer wins.
    """
    worst = torch.argsort(cost, descending=True, stable=True)[:count]
    farthest_sim = sims.new_full(cost.shape, math.inf).scatter_reduce_(0, labels, sims, "amin")  # K
    rows = torch.arange(len(x), device=x.device)
    candidates = torch.where(sims == farthest_sim[labels], rows, len(x))  # N_r; len(x) means "not farthest"
    farthest_row = labels.new_full(cost.shape, len(x)).scatter_reduce_(0, labels, candidates, "amin")  # K
    offered = farthest_row[worst]  # count; len(x) where this rank holds no member
    offer_rows = x.new_zeros(count, x.shape[1])
    offer_rows[offered < len(x)] = x[offered[offered < len(x)]]
    offer_sims = farthest_sim[worst]  # count; inf where this rank holds no member
    if sync:
        offer_rows = dist.all_gather_cat(offer_rows).view(-1, count, x.shape[1])  # W x count x D
        offer_sims = dist.all_gather_cat(offer_sims).view(-1, count)  # W x count
    else:
        offer_rows, offer_sims = offer_rows[None], offer_sims[None]
    winner = offer_sims.argmin(dim=0)  # count; the first rank on ties
    return offer_rows[winner, torch.arange(count, device=x.device)]


def _sum_over_ranks(tensor: torch.Tensor, sync: bool) -> torch.Tensor:
    return dist.all_reduce_sum(tensor) if sync else tensor


def _broadcast_result(result: KMeansResult | None, k: int, x: torch.Tensor) -> KMeansResult:
    """Rank 0's result on every rank (``gather`` mode); ``result`` is None on the other ranks."""
    if result is None:  # placeholders that the broadcast overwrites
        sizes = torch.empty(k, dtype=torch.long, device=x.device)
        result = KMeansResult(x.new_empty(k, x.shape[1]), sizes, 0, 0.0, 0)
    scalars = torch.tensor(
        [result.num_reseeded, result.mean_distance, result.iterations], dtype=torch.float64, device=x.device
    )
    for tensor in (result.centroids, result.sizes, scalars):
        dist.broadcast(tensor)
    num_reseeded, mean_distance, iterations = scalars.tolist()
    return KMeansResult(result.centroids, result.sizes, int(num_reseeded), mean_distance, int(iterations))
