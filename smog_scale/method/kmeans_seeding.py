"""k-means seeding over the union of all ranks' caches (docs/method.md "Periodic re-grouping" 1).

Greedy k-means++ runs on a summary of the union, not on its rows: a sample of the union splits it into
cells (every row joins the sampled row nearest to it), and each cell is kept as its row count and the sum
of its rows (:func:`sample_cells`). For unit rows the cosine distance is linear in the row, so a cell of n
rows with sum s costs ``n - s . c`` against a unit centroid c: the cells give the union's exact cost for any
centroids that do not split a cell, while the seeding loop stays the sample's size.
Every rank counts and sums its own rows; the sums are all-reduced; rank 0 seeds and broadcasts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from smog_scale import dist
from smog_scale.method.centroid_search import nearest_sample_rows

# Largest candidate-by-cell similarity matrix that CPU seeding precomputes (the default 16,384 cells: 1 GiB).
_GRAM_BYTES = 2**30
# Least rows of the seeding sample per centroid: the sample grows with K past ``init_sample``.
_SAMPLE_ROWS_PER_CENTROID = 4

Search = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sample_size(k: int, init_sample: int) -> int:
    """Rows of the union that seeding samples for ``k`` centroids: at least ``init_sample`` and 4 per centroid."""
    return max(init_sample, _SAMPLE_ROWS_PER_CENTROID * k, k)


def sample_union(x: torch.Tensor, size: int, total_rows: int, seed: int, sync: bool) -> torch.Tensor:
    """About ``size`` x D rows drawn without replacement from the union, each rank in proportion to its rows.

    ``x`` holds this rank's N_r x D unit rows. With ``sync`` every rank receives the gathered sample; its
    share is drawn with ``seed + rank``.
    """
    share = min(len(x), math.ceil(size * len(x) / total_rows))
    generator = torch.Generator().manual_seed(seed + (dist.rank() if sync else 0))
    rows = x[torch.randperm(len(x), generator=generator)[:share].to(x.device)]
    return dist.all_gather_cat(rows) if sync else rows


def sample_cells(
    x: torch.Tensor, size: int, total_rows: int, seed: int, search: Search, generator: torch.Generator | None,
    sync: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum (M x D) and count (M, float32) of the union's rows in each cell of a sample of about ``size`` rows.

    ``x`` holds this rank's N_r x D unit rows; with ``sync`` the sample is drawn from every rank and the sums
    and counts are all-reduced, so every rank holds those of the union. Half the sample is drawn uniformly
    (:func:`sample_union`), the other half with probability proportional to each row's cosine distance to
    the nearest row of the first half (one round of k-means||, Bahmani et al. 2012; ``generator`` on
    ``x``'s device draws this rank's share): rows that the first half leaves far from any sampled row,
    scattered rows and small clusters, get cells of their own, where a uniform sample of 4-5 rows per
    centroid would fold them into a big cluster's cell. A union of at most ``size`` rows is sampled whole.
    """
    far_size = 0 if size >= total_rows else size // 2
    sample = sample_union(x, size - far_size, total_rows, seed, sync)
    sims, nearest_row = _nearest_sample_row(sample, x, seed, search)  # N_r, N_r
    if far_size:
        far = _far_rows(x, (1 - sims).clamp_min_(1e-12), far_size, generator, sync)
        far_sims, far_row = _nearest_sample_row(far, x, seed, search)
        nearest_row = torch.where(far_sims > sims, far_row + len(sample), nearest_row)
        sample = torch.cat([sample, far])
    cells = torch.zeros(len(sample), x.shape[1] + 1, device=x.device)  # M x (D + 1): sum, then count
    cells.index_add_(0, nearest_row, torch.cat([x, torch.ones(len(x), 1, device=x.device)], dim=1))
    if sync:  # one collective for both
        cells = dist.all_reduce_sum(cells)
    return cells[:, :-1], cells[:, -1]


def _nearest_sample_row(
    sample: torch.Tensor, x: torch.Tensor, seed: int, search: Search
) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity to, and index of, the row of ``sample`` (M x D) nearest to each row of ``x`` -> (N_r, N_r int64).

    On the CPU :func:`smog_scale.method.centroid_search.nearest_sample_rows` finds them (an inverted-file
    index with faiss: a row may join a near sample row rather than the nearest; the cells still give the exact
    cost of the rows they hold, module docstring, only less compact cells). Elsewhere ``search`` (the Lloyd
    loop's exact nearest-centroid search, over ``x``) finds them.
    """
    if not len(x):  # this rank's cache is still empty
        return x.new_empty(0), torch.empty(0, dtype=torch.long, device=x.device)
    if x.device.type != "cpu":
        return search(sample)
    return nearest_sample_rows(sample, x, seed)


def _far_rows(
    x: torch.Tensor, distance: torch.Tensor, size: int, generator: torch.Generator | None, sync: bool
) -> torch.Tensor:
    """About ``size`` x D rows of the union drawn without replacement in proportion to ``distance`` (N_r).

    With ``sync`` each rank draws its share of ``size`` in proportion to its summed distance (one read of the
    ranks' sums on the host) and every rank receives the gathered rows.
    """
    share = min(len(x), size)
    if sync:
        local = distance.sum(dtype=torch.float64)[None]
        share = min(share, math.ceil(size * float(local[0] / dist.all_gather_cat(local).sum())))
    rows = x[torch.multinomial(distance, share, generator=generator)] if share else x[:0]
    return dist.all_gather_cat(rows) if sync else rows


def greedy_kmeanspp(
    sums: torch.Tensor, counts: torch.Tensor, k: int, trials: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Greedy k-means++ seeding (scikit-learn's rule) of k centroids over cells of the union -> k x D unit rows.

    ``sums`` (M x D) and ``counts`` (M) describe the cells (:func:`sample_cells`); ``generator`` None draws
    from torch's default generator. Written here because faiss only seeds at random. The candidates are
    the cells' mean directions; a cell with mean m costs each of its rows ``1 - m . c`` against centroid c,
    at least ``1 - |m|`` (its rows' spread, which no centroid removes). The first seed is drawn in
    proportion to the counts; each further step draws ``trials`` candidates with probability proportional
    to a cell's count times the cost above that floor (for unit rows, half the squared distance of
    k-means++) and keeps the one that lowers the summed cost most.

    Seeding on the sampled rows themselves, as if each stood at its cell's place, overrates a centroid
    beside another in the same cluster (a sampled row lies a cluster's spread from the cluster's mean, its
    cell's mean much nearer): on unbalanced clusters with scattered rows it spent centroids splitting
    clusters and left scattered rows without one, 10-14% above scikit-learn's k-means++ on every row.

    On the CPU the candidates' similarities to the cells come from the M x M matrix of all of them when
    it fits in ``_GRAM_BYTES``: one big matmul on every thread instead of k small ones on one thread (each
    cell is a candidate about ``k * trials / M`` times). Seeding 3,000 of 16,384 sampled rows, the same
    matmuls before cells replaced the rows: 2.0 s instead of 4.3 s. A GPU multiplies each step's
    candidates in microseconds, so it does not spend the memory.
    """
    cells = len(sums)
    means = sums / counts.clamp_min(1)[:, None]  # M x D, norm <= 1 (zero for an empty cell)
    directions = F.normalize(sums, dim=1)  # M x D candidate centroids
    floor = 1 - means.norm(dim=1)  # M
    gram_bytes = cells * cells * sums.element_size()
    gram = directions @ means.T if sums.device.type == "cpu" and gram_bytes <= _GRAM_BYTES else None
    chosen = torch.empty(k, dtype=torch.long, device=sums.device)
    chosen[0] = torch.multinomial(counts, 1, generator=generator)[0]
    cost = 1 - means @ directions[chosen[0]]  # M: each row's cosine distance to the nearest seed so far
    sims = sums.new_empty(trials, cells)
    with _one_cpu_thread(sums.device):
        for j in range(1, k):
            # Floor 1e-12 keeps multinomial valid when rounding or duplicate rows leave nothing to lower.
            reducible = (cost - floor).clamp_min_(1e-12) * counts
            candidates = torch.multinomial(reducible, trials, replacement=True, generator=generator)
            if gram is None:
                torch.mm(directions[candidates], means.T, out=sims)
            else:
                torch.index_select(gram, 0, candidates, out=sims)
            # How much each candidate would lower each cell's per-row cost: relu(cost - (1 - m . c)).
            decrease = sims.add_(cost - 1).clamp_min_(0)  # trials x M
            best = (decrease @ counts).argmax()
            chosen[j] = candidates[best]
            cost = cost - decrease[best]
    return directions[chosen]


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
