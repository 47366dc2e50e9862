"""Where k-means' nearest-centroid searches run: faiss's GPU index with faiss-gpu on CUDA, torch elsewhere.

faiss is optional. The ``cpu`` extra installs faiss-cpu, the ``gpu`` extra faiss-gpu-cu12: one distribution
each, as both own the ``faiss`` package and the files that win decide whether the GPU index exists. Without
faiss every search is torch's: the Lloyd loop's search is torch's off CUDA anyway (:class:`NearestCentroid`
says why), and the seeding's cells (:func:`nearest_sample_rows`) are then found exactly instead of through
faiss's inverted-file index. :func:`backend` names the search a process uses; the self-check and the
first re-grouping's log line print it.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any, Literal

import torch

from smog_scale.method.grouping import nearest

Backend = Literal["faiss-gpu", "torch"]
# Temporary memory of this process's faiss GPU resources, outside torch's allocator. faiss's default is up to
# 1.5 GiB per StandardGpuResources; a flat index tiles its N x K distances to fit what it is given, and 256 MiB
# holds float32 distances of about 22,000 rows x 3,000 centroids. tools/memory.py counts it.
FAISS_TEMP_MEMORY_BYTES = 256 * 2**20
# The CPU index that finds each union row's nearest sample row (its cell in k-means seeding): sample rows
# per inverted list, lists searched per row, k-means iterations that place the lists.
_ROWS_PER_LIST, _LISTS_PROBED, _LIST_ITERS = 128, 4, 10


def _import_faiss() -> Any:
    """faiss with its torch bridge (its indexes then search torch tensors, CUDA ones too), or None."""
    try:
        module = importlib.import_module("faiss")
        importlib.import_module("faiss.contrib.torch_utils")
    except ImportError:
        return None
    return module


faiss: Any = _import_faiss()


def backend() -> Backend:
    """The Lloyd loop's search in this process: ``faiss-gpu`` (CUDA and faiss-gpu installed), else ``torch``."""
    gpu_index = faiss is not None and hasattr(faiss, "GpuIndexFlatIP")
    return "faiss-gpu" if gpu_index and torch.cuda.is_available() else "torch"


def describe() -> str:
    """The backend and the faiss installed, e.g. ``torch (faiss 1.15.0, CPU only)``."""
    if faiss is None:
        return f"{backend()} (no faiss installed)"
    kind = "GPU index" if hasattr(faiss, "GpuIndexFlatIP") else "CPU only"
    return f"{backend()} (faiss {faiss.__version__}, {kind})"


@cache
def gpu_resources() -> Any:
    """This process's one faiss ``StandardGpuResources`` (streams, cuBLAS handle, ``FAISS_TEMP_MEMORY_BYTES`` of
    temporary memory), made at the first GPU search and kept: one per search would allocate them anew."""
    resources = faiss.StandardGpuResources()
    resources.setTempMemory(FAISS_TEMP_MEMORY_BYTES)
    return resources


class NearestCentroid:
    """Nearest centroid by inner product: a faiss flat index on the GPU with CUDA and faiss-gpu, else torch.

    Elsewhere :func:`smog_scale.method.grouping.nearest` (blocked matmul, the grouping step's own search) runs on
    the rows' device. It replaces faiss's CPU index because faiss-cpu bundles an OpenBLAS that falls back
    to generic kernels on current Xeons: 65,536 rows x 3,000 centroids took 0.45 s against faiss's 1.0 s
    (0.27 s for both with ``OPENBLAS_CORETYPE=SKYLAKEX``), with the same labels but for near-ties.
    """

    def __init__(self, x: torch.Tensor) -> None:
        use_gpu = backend() == "faiss-gpu"
        self.device = x.device
        self.gpu = gpu_resources() if use_gpu else None
        self.rows = x.to(torch.device("cuda", torch.cuda.current_device())) if use_gpu and not x.is_cuda else x

    def __call__(self, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarity to, and index of, each row's nearest centroid (K x D unit rows) -> (N_r, N_r int64)."""
        if self.gpu is None:
            return nearest(centroids, self.rows)
        config = faiss.GpuIndexFlatConfig()
        config.device = self.rows.device.index
        index = faiss.GpuIndexFlatIP(self.gpu, centroids.shape[1], config)
        index.add(centroids.to(self.rows.device).contiguous())
        sims, labels = index.search(self.rows, 1)
        return sims[:, 0].to(self.device), labels[:, 0].to(self.device)


def nearest_sample_rows(sample: torch.Tensor, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity to, and index of, the row of ``sample`` (M x D) nearest to each row of ``x`` (N_r x D unit
    rows) -> (N_r, N_r int64).

    On the CPU with faiss, an inverted-file index over the sample that scans 4 of its M / 128 lists per row
    (``seed`` places the lists), since an exact search (N x M x D, and an argmax over N x M) costs several
    Lloyd passes there; a row whose nearest sample row lies in a list it does not scan gets the nearest one it
    scans (on the k-means benchmark's ``modes-k-noise1`` data 6% of the rows). Elsewhere, and without faiss,
    the search is exact (:class:`NearestCentroid`).
    """
    if x.device.type != "cpu" or faiss is None:
        return NearestCentroid(x)(sample)
    lists = max(1, len(sample) // _ROWS_PER_LIST)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed, index.cp.niter = seed, _LIST_ITERS
    index.train(sample)
    index.add(sample)
    index.nprobe = min(lists, _LISTS_PROBED)
    sims, rows = index.search(x, 1)
    return sims[:, 0], rows[:, 0]
