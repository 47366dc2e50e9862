"""Benchmark ``smog_scale.method.kmeans.fit`` against scikit-learn's KMeans and faiss's own k-means.

The baseline is scikit-learn's KMeans with k-means++ initialization (what a naive port uses); faiss.Kmeans
with its default random initialization and 20 iterations shows why initialization matters. Every method
runs in its own subprocess (beside faiss, scikit-learn's k-means runs 2x slower) on data that the
subprocess generates from a seed:

- ``uniform``: unit vectors drawn uniformly on the sphere;
- ``clustered``: a mixture of ``k`` von-Mises-Fisher-like blobs (a random direction plus Gaussian noise,
  normalized) with uneven blob weights and spreads, tuned so scikit-learn ends near a mean cosine
  distance of 0.13 at the default size;
- ``dirichlet``: ``2 * k`` such blobs of one spread (0.3) with Dirichlet(1) weights (uniform on the simplex:
  a few big modes, many small ones), so k-means must choose which modes get a centroid of their own.
  A seeding sample of a few rows per centroid misjudges the small modes' sizes.

Quality is the mean cosine distance of every row to its nearest normalized centroid, the same
measure for all methods, computed outside the timed region.

    python benchmarks/bench_kmeans.py            # 65,536 x 128 into 3,000 clusters (minutes)
    python benchmarks/bench_kmeans.py --quick    # 16,384 x 128 into 500 clusters, one repeat

The subprocesses inherit the environment (``--blas inherited``, the default), and the header prints the
variables that matter here:
- ``OPENBLAS_CORETYPE``: faiss-cpu 1.15.1 bundles OpenBLAS 0.3.15, which does not know Sapphire Rapids
  and falls back to its generic "Prescott" kernels (threadpoolctl shows it); faiss's flat search then
  runs 3-5x slower. ``OPENBLAS_CORETYPE=SKYLAKEX`` (AVX-512 CPUs only) fixes that; numpy's and
  scipy's newer OpenBLAS, which scikit-learn uses, pick SkylakeX on their own, so it leaves them alone.
  Only the faiss row depends on it: on the CPU ``smog_scale.method.kmeans`` searches with torch's matmul.
  Some machines set ``OPENBLAS_CORETYPE`` (and ``OPENBLAS_L2_SIZE``) for every process, e.g. to
  ``Haswell``, which also moves numpy's OpenBLAS, and so scikit-learn, to AVX2 kernels. ``--blas unset``
  runs every subprocess with both removed, ``--blas both`` prints one table per setting; each row names
  the OpenBLAS kernels its process ran (threadpoolctl), so a table says which BLAS it measured.
- ``OMP_WAIT_POLICY``: on a loaded 2-core machine it changes every method's time several-fold, in
  either direction; leave it unset (the default) for comparisons.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import version

import numpy as np

METHODS = {
    "sklearn": "scikit-learn k-means++",
    "faiss": "faiss random init, 20 it",
    "smog_scale": "smog_scale k-means",  # smog_scale.method.kmeans.fit
}
KINDS = ("uniform", "clustered", "dirichlet")
# Environment variables that change these timings on a small shared machine (see the module docstring).
TUNING_VARIABLES = ("OMP_WAIT_POLICY", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
# Removed together by ``--blas unset``: the pair that pins OpenBLAS's kernels.
OPENBLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def make_data(kind: str, rows: int, dim: int, k: int, seed: int) -> np.ndarray:
    """rows x dim float32 unit vectors of the given kind (see the module docstring).

    numpy, not torch: the scikit-learn subprocess imports neither torch nor faiss, whose OpenMP
    runtimes slow it down.
    """
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        x = rng.standard_normal((rows, dim))
    elif kind == "dirichlet":
        modes = 2 * k
        directions = _normalized(rng.standard_normal((modes, dim)))
        mode = rng.choice(modes, size=rows, p=rng.dirichlet(np.ones(modes)))
        x = directions[mode] + 0.3 * rng.standard_normal((rows, dim)) / np.sqrt(dim)
    else:
        directions = _normalized(rng.standard_normal((k, dim)))
        weights = np.exp(0.5 * rng.standard_normal(k))  # lognormal blob sizes
        spreads = 0.56 * np.exp(0.25 * rng.standard_normal(k))  # lognormal blob widths
        blob = rng.choice(k, size=rows, p=weights / weights.sum())
        noise = rng.standard_normal((rows, dim)) / np.sqrt(dim)
        x = directions[blob] + spreads[blob, None] * noise
    return _normalized(x).astype(np.float32)


def _normalized(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def load_method(method: str) -> Callable[[np.ndarray, int, int], tuple[np.ndarray, int]]:
    """``method``'s function (rows x dim data, k, seed) -> (k x dim centroids, Lloyd iterations).

    Imports happen here, outside the timed region.
    """
    if method == "sklearn":
        from sklearn.cluster import KMeans

        def run_sklearn(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, int]:
            model = KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=seed).fit(x)
            return model.cluster_centers_, model.n_iter_

        return run_sklearn
    if method == "faiss":
        import faiss

        def run_faiss(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, int]:
            model = faiss.Kmeans(x.shape[1], k, niter=20, spherical=True, seed=seed)
            model.train(x)
            return model.centroids, 20

        return run_faiss
    import torch

    from smog_scale.method.kmeans import fit

    def run_smog_scale(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, int]:
        result = fit(torch.from_numpy(x), k, seed=seed)
        return result.centroids.numpy(), result.iterations

    return run_smog_scale


def mean_cosine_distance(x: np.ndarray, centroids: np.ndarray) -> float:
    """Mean over the rows of x (N x D) of 1 - cos to the nearest normalized centroid (K x D)."""
    unit = _normalized(centroids.astype(np.float32))
    nearest = [(chunk @ unit.T).max(axis=1) for chunk in np.array_split(x, max(1, len(x) // 8192))]
    return 1.0 - float(np.concatenate(nearest).astype(np.float64).mean())


def openblas_kernels() -> str:
    """The kernels of every OpenBLAS loaded in this process, e.g. ``scipy_openblas64:SkylakeX``."""
    from threadpoolctl import threadpool_info

    found = []
    for lib in threadpool_info():
        if lib["internal_api"] == "openblas":
            name = os.path.basename(lib["filepath"]).removeprefix("lib").split("-")[0].split(".")[0].rstrip("_")
            found.append(f"{name}:{lib.get('architecture')}")
    return ",".join(found) or "none"


def worker(args: argparse.Namespace) -> None:
    """Subprocess: generate the data, time ``args.repeats`` runs, print one JSON line."""
    x = make_data(args.kind, args.rows, args.dim, args.k, seed=args.seed)
    run = load_method(args.worker)
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        centroids, iterations = run(x, args.k, args.seed)
        seconds.append(time.perf_counter() - start)
    distance = mean_cosine_distance(x, centroids)
    print(json.dumps({"seconds": seconds, "iterations": int(iterations), "distance": distance,
                      "openblas": openblas_kernels()}))


def measure(args: argparse.Namespace, kind: str, method: str, repeats: int, environment: dict[str, str]) -> dict:
    """Run one (kind, method) in a fresh subprocess with ``environment`` and return its JSON report."""
    command = [sys.executable, __file__, "--worker", method, "--kind", kind, "--repeats", str(repeats)]
    for flag, value in (("--rows", args.rows), ("--dim", args.dim), ("--k", args.k), ("--seed", args.seed)):
        command += [flag, str(value)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
    return json.loads(out.strip().splitlines()[-1])


def blas_environment(setting: str) -> dict[str, str]:
    """The subprocesses' environment: this one (``inherited``) or this one without OpenBLAS's pins."""
    if setting == "inherited":
        return dict(os.environ)
    return {name: value for name, value in os.environ.items() if name not in OPENBLAS_VARIABLES}


def report(args: argparse.Namespace, setting: str) -> None:
    """Measure every (kind, method) under one BLAS setting, print the table and the ratios to scikit-learn."""
    env = blas_environment(setting)
    conditions = ", ".join(f"{name}={env.get(name, 'unset')}" for name in TUNING_VARIABLES)
    versions = ", ".join(f"{name} {version(name)}" for name in ("torch", "faiss-cpu", "scikit-learn"))
    print(f"k-means: {args.rows} x {args.dim} unit vectors into {args.k} clusters; {os.cpu_count()} CPUs; "
          f"{versions}\nBLAS setting '{setting}': {conditions}")
    print(f"{'data':<10} {'method':<26} {'seconds':>8} {'runs':>5} {'iters':>6} {'mean cos dist':>14}  openblas")
    results: dict[tuple[str, str], tuple[float, float]] = {}
    for kind in args.kinds:
        for method in args.methods:
            repeats = args.baseline_repeats if method == "sklearn" else args.repeats
            out = measure(args, kind, method, repeats, env)
            seconds = statistics.median(out["seconds"])
            results[kind, method] = seconds, out["distance"]
            print(f"{kind:<10} {METHODS[method]:<26} {seconds:>8.2f} {repeats:>5} {out['iterations']:>6} "
                  f"{out['distance']:>14.4f}  {out['openblas']}", flush=True)
    if "sklearn" not in args.methods:
        return
    print("\nvs scikit-learn (speed-up: target >= 8x; distance ratio: target <= 1.01)")
    for kind in args.kinds:
        base_seconds, base_distance = results[kind, "sklearn"]
        for method in args.methods:
            if method != "sklearn":
                seconds, distance = results[kind, method]
                print(f"{kind:<10} {METHODS[method]:<26} speed-up {base_seconds / seconds:6.1f}x   "
                      f"distance ratio {distance / base_distance:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of faiss and smog_scale (median)")
    parser.add_argument("--baseline-repeats", type=int, default=1, help="timed runs of scikit-learn (slow)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--blas", choices=("inherited", "unset", "both"), default="inherited",
                        help="subprocess environment: as this one, without OPENBLAS_CORETYPE and "
                             "OPENBLAS_L2_SIZE, or one table for each")
    parser.add_argument("--quick", action="store_true", help="16,384 rows into 500 clusters, one repeat (overrides --rows, --k, repeats)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.k, args.repeats, args.baseline_repeats = 16384, 500, 1, 1
    if args.worker:
        worker(args)
        return
    for setting in ("inherited", "unset") if args.blas == "both" else (args.blas,):
        report(args, setting)
        print()


if __name__ == "__main__":
    main()
