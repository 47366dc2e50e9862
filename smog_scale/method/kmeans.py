"""Spherical k-means over the union of all ranks' feature caches (docs/method.md "Periodic re-grouping" 1).

Two modes, both ending with bit-identical centroids on every rank:

- ``gather``: gather the caches on rank 0, cluster the union there, broadcast the result.
- ``sharded``: no rank holds the union. Rank 0 seeds the centroids from a small sample gathered from
  every rank and broadcasts them; each iteration every rank assigns its own rows to the nearest centroid
  and the per-centroid sums and counts are all-reduced (DeepCluster-v2's M-step).

Seeding is greedy k-means++ on a weighted sample (:func:`_sample_weights`): each sampled row stands for
the rows of the union nearest to it, counted by every rank over its own rows and all-reduced, so the
seeds see every row's density while the seeding loop stays the sample's size.

Both run the same Lloyd loop (``gather`` runs it on rank 0 alone). The nearest-centroid search is a faiss
GPU index with faiss-gpu, torch's blocked matmul elsewhere (``smog_scale.method.centroid_search``); the loop
is written here because ``faiss.Kmeans`` cannot all-reduce between iterations and can leave a
cluster empty (it splits big clusters, which duplicate rows defeat). Here an empty cluster takes the member
farthest from its centroid in one of the clusters with the largest summed distance, until none is empty.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

from smog_scale import dist
from smog_scale.method.centroid_search import NearestCentroid, nearest_sample_rows

Mode = Literal["gather", "sharded"]
Init = Literal["greedy_kmeans++", "random"]

# Lloyd iterations allowed past ``iters`` to re-seed clusters that are still empty.
_MAX_REPAIR_ITERS = 10
# Largest Gram matrix of the seeding sample that CPU seeding precomputes (the default 16,384 rows: 1 GiB).
_GRAM_BYTES = 2**30
# Least rows of the seeding sample per centroid: the sample grows with K past ``init_sample``.
_SAMPLE_ROWS_PER_CENTROID = 4


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
        init: ``"greedy_kmeans++"`` (:func:`_greedy_kmeanspp` on a weighted sample) or ``"random"`` rows
            (faiss's own init). On the clustered data of benchmarks/bench_kmeans.py (65,536 rows, K = 3,000)
            greedy seeding ended at a mean cosine distance of 0.1369, 1.2% above scikit-learn's k-means++
            on all rows (0.1352); faiss's random seeding 17% above it.
        init_sample: least rows of the union (drawn from every rank in proportion) that seeding looks at;
            at least ``4 * k`` are drawn. Each is weighted by the union rows nearest to it. Seeding time
            grows with it; on the CPU seeding holds the sample's Gram matrix up to 1 GiB (16,384 rows).
            On the benchmark's ``dirichlet`` data (6,000 modes of Dirichlet(1) weights, K = 3,000) the
            weighted 16,384-row sample ended at 0.1159 and 12,000 rows at 0.1175 (scikit-learn 0.1174);
            the same 16,384 rows unweighted at 0.1232, as the sample misjudged the small modes' sizes.
        init_trials: candidates tried per greedy seeding step; seeding time grows with it. On the
            ``dirichlet`` data 12 ended at 0.1158 as 24 did, on the clustered data at 0.1379 (24: 0.1369).
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
    """Weight a sample of the union on every rank, seed from it on rank 0, broadcast, then run Lloyd's loop.

    ``x`` holds this rank's N_r x D unit rows.

    ``sync=True`` reduces over all ranks (``sharded``); ``sync=False`` treats ``x`` as the whole union and
    issues no collective (``gather`` on rank 0).
    """
    size = max(options.init_sample, _SAMPLE_ROWS_PER_CENTROID * k, k)
    sample = _sample_union(x, size, total_rows, options.seed, sync)
    greedy = options.init == "greedy_kmeans++"
    weights = _sum_over_ranks(_sample_weights(sample, x, options.seed), sync) if greedy else None
    centroids = x.new_empty(k, x.shape[1])
    if not sync or dist.rank() == 0:
        generator = torch.Generator(device=x.device).manual_seed(options.seed)
        if weights is not None:
            centroids = _greedy_kmeanspp(sample, weights, k, options.init_trials, generator)
        else:
            centroids = sample[torch.randperm(len(sample), generator=generator, device=x.device)[:k]]
    if sync:
        dist.broadcast(centroids)
    return _lloyd(x, centroids, total_rows, iters=options.iters, tol=options.tol, sync=sync)


def _sample_union(x: torch.Tensor, size: int, total_rows: int, seed: int, sync: bool) -> torch.Tensor:
    """About ``size`` x D rows drawn without replacement from the union, each rank in proportion to its rows.

    With ``sync`` every rank receives the gathered sample; its share is drawn with ``seed + rank``.
    """
    share = min(len(x), math.ceil(size * len(x) / total_rows))
    generator = torch.Generator().manual_seed(seed + (dist.rank() if sync else 0))
    rows = x[torch.randperm(len(x), generator=generator)[:share].to(x.device)]
    return dist.all_gather_cat(rows) if sync else rows


def _sample_weights(sample: torch.Tensor, x: torch.Tensor, seed: int) -> torch.Tensor:
    """How many rows of ``x`` (N_r x D unit rows) lie nearest to each row of ``sample`` (M x D) -> M float32.

    Summed over the ranks, these weights make the sample a coreset of the union (as k-means|| weights its
    candidates): seeding on an unweighted sample of a few rows per centroid misjudges the sizes of small
    clusters. The search: :func:`smog_scale.method.centroid_search.nearest_sample_rows`.
    """
    weights = torch.zeros(len(sample), device=x.device)
    if not len(x):  # this rank's cache is still empty
        return weights
    return weights.index_add_(0, nearest_sample_rows(sample, x, seed), torch.ones(len(x), device=x.device))


def _greedy_kmeanspp(
    sample: torch.Tensor, weights: torch.Tensor, k: int, trials: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Greedy k-means++ seeding (as scikit-learn's, with sample weights) of k rows of ``sample`` -> k x D.

    ``sample`` holds M x D unit rows, ``weights`` (M) how many rows of the union each stands for;
    ``generator`` None draws from torch's default generator. Written here because faiss only seeds at
    random. The first seed is drawn in proportion to the weights; each further step draws ``trials``
    candidates with probability proportional to weight times cosine distance to the nearest seed so far
    (for unit rows, half the squared distance of k-means++) and keeps the one that lowers the weighted
    summed distance most.

    On the CPU the candidates' similarities to the sample come from the sample's Gram matrix when it fits
    in ``_GRAM_BYTES``: one big matmul on every thread instead of k small ones on one thread (each row is
    a candidate about ``k * trials / M`` times). Seeding 3,000 of 16,384 rows: 2.0 s instead of 4.3 s.
    A GPU multiplies each step's candidates in microseconds, so it does not spend the memory.
    """
    rows = len(sample)
    gram_bytes = rows * rows * sample.element_size()
    gram = sample @ sample.T if sample.device.type == "cpu" and gram_bytes <= _GRAM_BYTES else None
    chosen = torch.empty(k, dtype=torch.long, device=sample.device)
    chosen[0] = torch.multinomial(weights, 1, generator=generator)[0]
    # Floor 1e-12 keeps multinomial valid: rounding can make a seed's own distance negative, and a sample
    # of duplicates leaves every distance at 0.
    distance = (1 - sample @ sample[chosen[0]]).clamp_min_(1e-12)  # M: to the nearest seed so far
    sims = sample.new_empty(trials, rows)
    with _one_cpu_thread(sample.device):
        for j in range(1, k):
            candidates = torch.multinomial(distance * weights, trials, replacement=True, generator=generator)
            if gram is None:
                torch.mm(sample[candidates], sample.T, out=sims)
            else:
                torch.index_select(gram, 0, candidates, out=sims)
            # How much each candidate would lower each row's distance: relu(distance - (1 - cos)).
            decrease = sims.add_(distance - 1).clamp_min_(0)  # trials x M
            best = (decrease @ weights).argmax()
            chosen[j] = candidates[best]
            distance = (distance - decrease[best]).clamp_min_(1e-12)
    return sample[chosen]


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run torch single-threaded inside the block when ``device`` is the CPU, then restore the thread count.

    Greedy seeding is thousands of steps of a few small ops each, where OpenMP's per-op fork and join
    turns a second thread into a gamble: seeding 3,000 of 16,384 rows took 2.0 s on one thread and 1.3-1.5 s
    on two on an idle 2-core machine, but 2.0-2.5 s against 5-26 s while two such jobs shared it.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _lloyd(
    x: torch.Tensor, centroids: torch.Tensor, total_rows: int, *, iters: int, tol: float, sync: bool
) -> KMeansResult:
    """Lloyd's loop from ``centroids`` (K x D) over ``x`` (N_r x D unit rows) with empty-cluster re-seeding.

    Each pass assigns every row to its nearest centroid (``centroid_search.NearestCentroid``), reduces the
    per-centroid sums and counts over ranks when ``sync``, and moves every centroid to its members'
    normalized mean; empty clusters are re-seeded (:func:`_reseed_rows`). It returns once ``iters``
    updates are done or ``tol`` is met and no cluster is empty, or when the repair budget is spent
    (``fit`` then raises).
    """
    search = NearestCentroid(x)
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
