"""Benchmark ``smog_scale.method.kmeans.fit`` against scikit-learn's and faiss's k-means on a family of shapes.

The baseline is scikit-learn's KMeans with k-means++ initialization (what a naive port uses); faiss.Kmeans
with its default random initialization and 20 iterations shows why initialization matters. Every method
runs in its own subprocess (beside faiss, scikit-learn's k-means runs 2x slower) on data that the
subprocess generates from a seed or reads from a file:

- ``uniform``: unit vectors drawn uniformly on the sphere;
- ``balanced``: ``k`` von-Mises-Fisher-like blobs (a random direction plus Gaussian noise of spread 0.5,
  normalized) of equal weight;
- ``clustered`` (issue 12's shape): ``k`` such blobs with lognormal weights and spreads (around 0.56);
- ``modes-{half,k,4k}-noise{1,10}``: unbalanced clusters, the hard case of issue 21: ``k / 2``, ``k`` or
  ``4 k`` blobs of spread 0.3 with Dirichlet(1) weights (uniform on the simplex: a few big modes, many small
  ones), plus 1% or 10% of the rows scattered uniformly on the sphere (noise that belongs to no mode), so
  k-means must choose which modes and which scattered rows get a centroid of their own;
- ``cache``: the real thing, the feature cache of a trained run: ``recipes/small_32px.yaml`` (750 steps on
  the small set, ``python -m smog_scale.data.synthetic.digits32``) with ``grouping.cache_size=65536``, read
  from the per-rank cache file of its last checkpoint (65,536 x 128 momentum features of its last 256
  steps). The run is trained on first use under ``--cache-dir`` (about 15 minutes on 2 idle cores: 1.1 s a
  step) and reused after; fewer ``--rows`` take a seeded subset.

Quality is the mean cosine distance of every row to its nearest normalized centroid, the same
measure for all methods, computed outside the timed region.

    python benchmarks/bench_kmeans.py            # 65,536 x 128 into 3,000 clusters (half an hour)
    python benchmarks/bench_kmeans.py --quick    # 16,384 x 128 into 500 clusters, one repeat

Per shape it prints each method's seconds (median), Lloyd iterations and mean cosine distance, then ours
against both: the distance ratio to scikit-learn and to faiss and the speed-up over scikit-learn, and a
summary line with the worst ratio to scikit-learn and the smallest speed-up over all shapes.

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
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
METHODS = {
    "sklearn": "scikit-learn k-means++",
    "faiss": "faiss random init, 20 it",
    "smog_scale": "smog_scale k-means",  # smog_scale.method.kmeans.fit
}
# Unbalanced shapes: modes per centroid, and the share of rows scattered on the sphere.
MODES = {"half": 0.5, "k": 1, "4k": 4}
NOISE = {"noise1": 0.01, "noise10": 0.1}
KINDS = ("uniform", "balanced", "clustered", *(f"modes-{m}-{n}" for m in MODES for n in NOISE), "cache")
# The run whose feature cache is the ``cache`` shape: the small-data recipe, with a cache of 65,536 rows.
CACHE_RECIPE, CACHE_ROWS = ROOT / "recipes" / "small_32px.yaml", 65536
# Environment variables that change these timings on a small shared machine (see the module docstring).
TUNING_VARIABLES = ("OMP_WAIT_POLICY", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
# Removed together by ``--blas unset``: the pair that pins OpenBLAS's kernels.
OPENBLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def make_data(kind: str, rows: int, dim: int, k: int, seed: int, cache_dir: Path) -> np.ndarray:
    """rows x dim float32 unit vectors of the given kind (see the module docstring).

    numpy, not torch: the scikit-learn subprocess imports neither torch nor faiss, whose OpenMP
    runtimes slow it down.
    """
    rng = np.random.default_rng(seed)
    if kind == "cache":
        return _cached_features(cache_dir / "small_32px", rows, dim, rng)
    if kind == "uniform":
        return _normalized(rng.standard_normal((rows, dim))).astype(np.float32)
    if kind in ("balanced", "clustered"):
        modes, scattered = k, 0.0
    else:
        _, mode_key, noise_key = kind.split("-")
        modes, scattered = round(MODES[mode_key] * k), NOISE[noise_key]
    directions = _normalized(rng.standard_normal((modes, dim)))  # drawn first: ``clustered`` is issue 12's data
    if kind == "balanced":
        weights, spreads = np.ones(modes), np.full(modes, 0.5)
    elif kind == "clustered":
        weights = np.exp(0.5 * rng.standard_normal(modes))  # lognormal blob sizes
        spreads = 0.56 * np.exp(0.25 * rng.standard_normal(modes))  # lognormal blob widths
    else:
        weights, spreads = rng.dirichlet(np.ones(modes)), np.full(modes, 0.3)
    blob = rng.choice(modes, size=rows, p=weights / weights.sum())
    x = directions[blob] + spreads[blob, None] * rng.standard_normal((rows, dim)) / np.sqrt(dim)
    if scattered:
        noise = rng.random(rows) < scattered  # rows that belong to no mode
        x[noise] = rng.standard_normal((int(noise.sum()), dim))
    return _normalized(x).astype(np.float32)


def _cached_features(cache_run: Path, rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` of the feature cache in ``cache_run``'s last checkpoint (all of them, or a ``rng`` subset)."""
    from safetensors.numpy import load_file

    path = sorted(cache_run.glob("checkpoints/step_*/cache_rank0.safetensors"))[-1]
    state = load_file(str(path))
    feats = state["feats"][: int(state["filled"])]  # the filled rows (all, once the run has filled the cache)
    if feats.shape[1] != dim or rows > len(feats):
        raise SystemExit(f"{path} holds {len(feats)} x {feats.shape[1]} features; asked for {rows} x {dim}")
    if rows < len(feats):
        feats = feats[np.sort(rng.choice(len(feats), size=rows, replace=False))]
    return _normalized(feats).astype(np.float32)


def train_cache_run(cache_dir: Path) -> None:
    """Train the ``cache`` shape's run into ``cache_dir/small_32px`` unless done (data: ``cache_dir/small``).

    One process with ``OMP_NUM_THREADS=2`` unless the caller sets it; ``cache_dir/train.log`` holds its output.
    """
    run = cache_dir / "small_32px"
    if (run / "done").is_file():
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_learning import shards  # imports torch: only the parent process builds the run

    train, _ = shards(cache_dir / "small")
    settings = [f"run.output_dir={run}", f"data.train_shards={train}", "monitor.knn_every_epochs=0",
                f"grouping.cache_size={CACHE_ROWS}", "run.overwrite=true"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.setdefault("OMP_NUM_THREADS", "2")
    print(f"training the run whose feature cache is the 'cache' shape: {run} ({cache_dir / 'train.log'})", flush=True)
    with open(cache_dir / "train.log", "w") as log:
        subprocess.run([sys.executable, str(ROOT / "smog_scale" / "train.py"), str(CACHE_RECIPE), *settings],
                       check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    (run / "done").touch()


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
    x = make_data(args.kind, args.rows, args.dim, args.k, args.seed, args.cache_dir)
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
    for flag, value in (("--rows", args.rows), ("--dim", args.dim), ("--k", args.k), ("--seed", args.seed),
                        ("--cache-dir", args.cache_dir)):
        command += [flag, str(value)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
    return json.loads(out.strip().splitlines()[-1])


def blas_environment(setting: str) -> dict[str, str]:
    """The subprocesses' environment: this one (``inherited``) or this one without OpenBLAS's pins."""
    if setting == "inherited":
        return dict(os.environ)
    return {name: value for name, value in os.environ.items() if name not in OPENBLAS_VARIABLES}


def report(args: argparse.Namespace, setting: str) -> None:
    """Measure every (kind, method) under one BLAS setting, print the table, ours against the others, a summary."""
    env = blas_environment(setting)
    conditions = ", ".join(f"{name}={env.get(name, 'unset')}" for name in TUNING_VARIABLES)
    versions = ", ".join(f"{name} {version(name)}" for name in ("torch", "faiss-cpu", "scikit-learn"))
    print(f"k-means: {args.rows} x {args.dim} unit vectors into {args.k} clusters; {os.cpu_count()} CPUs; "
          f"{versions}\nBLAS setting '{setting}': {conditions}")
    print(f"{'data':<18} {'method':<26} {'seconds':>8} {'runs':>5} {'iters':>6} {'mean cos dist':>14}  openblas")
    results: dict[tuple[str, str], tuple[float, float]] = {}
    for kind in args.kinds:
        for method in args.methods:
            repeats = args.baseline_repeats if method == "sklearn" else args.repeats
            out = measure(args, kind, method, repeats, env)
            seconds = statistics.median(out["seconds"])
            results[kind, method] = seconds, out["distance"]
            print(f"{kind:<18} {METHODS[method]:<26} {seconds:>8.2f} {repeats:>5} {out['iterations']:>6} "
                  f"{out['distance']:>14.4f}  {out['openblas']}", flush=True)
    if "smog_scale" not in args.methods:
        return
    others = [method for method in ("sklearn", "faiss") if method in args.methods]
    print("\nsmog_scale k-means against the others (distance ratio to scikit-learn: target <= 1.01; "
          "speed-up over scikit-learn: target >= 8x)")
    print(f"{'data':<18} " + " ".join(f"{'ratio to ' + m:>17}" for m in others) + f" {'speed-up':>9}")
    ratios: dict[str, list[tuple[float, str]]] = {method: [] for method in others}
    speedups = []
    for kind in args.kinds:
        seconds, distance = results[kind, "smog_scale"]
        for method in others:
            ratios[method].append((distance / results[kind, method][1], kind))
        speedup = results[kind, "sklearn"][0] / seconds if "sklearn" in others else math.nan
        speedups.append((speedup, kind))
        print(f"{kind:<18} " + " ".join(f"{ratios[m][-1][0]:>17.3f}" for m in others) + f" {speedup:>8.1f}x")
    worst = [f"distance ratio to {m} {max(ratios[m])[0]:.3f} ({max(ratios[m])[1]})" for m in others]
    print(f"worst over {len(args.kinds)} shapes: " + ", ".join(worst)
          + (f", speed-up {min(speedups)[0]:.1f}x ({min(speedups)[1]})" if "sklearn" in others else ""))


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
    parser.add_argument("--quick", action="store_true",
                        help="16,384 rows into 500 clusters, one repeat (overrides --rows, --k, repeats)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "bench_kmeans",
                        help="where the 'cache' shape's run is trained on first use and read after")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.k, args.repeats, args.baseline_repeats = 16384, 500, 1, 1
    if args.worker:
        worker(args)
        return
    if "cache" in args.kinds:
        train_cache_run(args.cache_dir)
    for setting in ("inherited", "unset") if args.blas == "both" else (args.blas,):
        report(args, setting)
        print()


if __name__ == "__main__":
    main()
