"""Grouping step cost: our vectorized update vs the naive port's Python loop over groups.

The naive port is the only public SMoG implementation's logic (lightly's SMoGPrototypes): normalize,
similarity matmul, logits / temperature, torch argmax, then a loop over the unique assigned groups.
Both run here, in the same process and the same thread count, on the same random inputs.

    python benchmarks/bench_grouping.py [--threads 1] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from smog_scale.method.grouping import assign, group_update


def naive_assign(groups: torch.Tensor, feats: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    logits = F.normalize(feats, dim=1) @ F.normalize(groups, dim=1).t() / tau
    return torch.argmax(logits, dim=-1)


def naive_update(groups: torch.Tensor, feats: torch.Tensor, assignments: torch.Tensor, beta: float) -> torch.Tensor:
    new = groups.clone()
    for k in torch.unique(assignments):
        mask = assignments == k
        new[k] = beta * groups[k] + (1 - beta) * feats[mask].mean(dim=0)
    return new


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--groups", type=int, default=3000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 4096])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    beta = 0.99
    print(f"torch {torch.__version__}, {args.threads} thread(s), K={args.groups}, D={args.dim}, median of {args.repeats}")
    header = f"{'B':>6} | {'measure':<18} | {'naive ms':>9} | {'ours ms':>8} | {'speed-up':>8}"
    print(header + "\n" + "-" * len(header))
    for batch in args.batches:
        groups = F.normalize(torch.randn(args.groups, args.dim), dim=1)
        feats = F.normalize(torch.randn(batch, args.dim), dim=1).requires_grad_(True)
        c = assign(groups, feats)
        assert torch.equal(c, naive_assign(groups, feats))
        rows = {
            "update alone": (
                lambda: naive_update(groups, feats, c, beta),
                lambda: group_update(groups, feats, c, beta),
            ),
            "assign + update": (
                lambda: naive_update(groups, feats, naive_assign(groups, feats), beta),
                lambda: group_update(groups, feats, assign(groups, feats), beta),
            ),
        }
        for name, (naive, ours) in rows.items():
            t_naive, t_ours = median_ms(naive, args.repeats), median_ms(ours, args.repeats)
            print(f"{batch:>6} | {name:<18} | {t_naive:>9.2f} | {t_ours:>8.3f} | {t_naive / t_ours:>7.1f}x")


if __name__ == "__main__":
    main()
