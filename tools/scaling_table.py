"""The grouping's memory and traffic at scale, on paper: ``python tools/scaling_table.py [--recipe R] [--worlds W]``.

Prints Markdown tables of what the feature cache, the periodic k-means (``gather`` vs ``sharded``,
as ``smog_scale.method.kmeans`` implements them) and the per-step group update cost per rank, as functions
of the world size W, the cache union U (``grouping.cache_size``: each rank keeps C = U // W rows), K
groups and D dimensions, then the world size past which ``sharded`` moves less data and whether
``gather``'s union fits the memory budget (the same at any W: the union does not grow with it).
Defaults come from the recipe (K, D, C, k-means iterations, global batch, re-grouping period); nothing
is run or measured. Memory and bytes received are the busiest rank's, counting the standard
algorithms: an all-reduce of n bytes receives 2 (W-1)/W n, an all-gather of n bytes per rank
receives (W-1) n, a gather to one rank receives (W-1) n there, a broadcast of n bytes
receives n on every other rank.

Formulas (v = bytes per value, 4 for float32; S = the k-means seeding sample, ``kmeans.fit``'s
``init_sample``; T = iters + 1 nearest-centroid passes, no early stop):

- feature cache per rank: C (D v + 8) (features and int64 sample ids).
- ``gather``: rank 0 gathers the union (``dist.gather_cat``: W padded parts, then their
  concatenation), clusters it alone and broadcasts the centroids. Peak on rank 0
  max(2 W C D v, W C (D v + 12) + S D v + S (D + 1) 4) (the seeding sample and its cells: a float32 sum
  and count per sampled row; the others hold their cache); received on rank 0 (W-1) C D v (the others
  K (D v + 8)); rank 0 searches T W C K D multiply-adds. W C = U whatever W.
- ``sharded``: each rank keeps its C rows; the S-row seeding sample is all-gathered and its cells
  all-reduced; every pass all-reduces K x D sums, K int64 counts and one float64. Peak per rank
  C (D v + 12) + S D v + S (D + 1) 4; received (W-1)/W S D v + 2 (W-1)/W S (D + 1) 4 + 2 K D v
  + T 2 (W-1)/W (K D v + 8 K + 8); every rank searches T C K D.
- group update, every step, both modes: an all-reduce of K int64 counts and of the K x D sums, whose
  backward all-reduces a K x D gradient; labels and assignments take 4 B K D multiply-adds per rank
  (2 global views x {momentum, online} features, B = global batch / W).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from smog_scale.config.derived import derive
from smog_scale.config.recipe_file import ConfigError
from smog_scale.config.schema import Config
from smog_scale.config.validation import load_config

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_WORLDS = (8, 64, 512)
GLOBAL_VIEWS = 2  # views a, b: labels from the momentum features, assignments from the online ones


@dataclass(frozen=True)
class Setup:
    """The sizes the costs depend on (from a recipe)."""

    num_groups: int  # K
    dim: int  # D
    cache_union: int  # U, grouping.cache_size: the rows of all ranks' caches together
    kmeans_iters: int
    init_sample: int  # S, rows of the union that seeding looks at
    global_batch: int
    regroup_every: int
    value_bytes: int = 4  # float32


class KMeansCost(NamedTuple):
    peak_bytes: float  # on the busiest rank, at the worst moment of one re-grouping
    received_bytes: float  # on the busiest rank, per re-grouping
    busiest_macs: float  # nearest-centroid multiply-adds on the busiest rank


class StepCost(NamedTuple):
    payload_bytes: float  # all-reduced per step (counts + sums + their gradient)
    received_bytes: float  # per rank per step
    label_macs: float  # per rank per step


def ring_allreduce(nbytes: float, world: int) -> float:
    return 2 * (world - 1) / world * nbytes


def cache_rows(s: Setup, world: int) -> int:
    """C: the rows each rank's cache keeps (``derived.cache_size_per_device``)."""
    return s.cache_union // world


def cache_bytes(s: Setup, world: int) -> float:
    return cache_rows(s, world) * (s.dim * s.value_bytes + 8)


def passes(s: Setup) -> int:
    return s.kmeans_iters + 1


def seeding_bytes(s: Setup) -> tuple[int, int]:
    """The seeding sample's bytes and its cells' (a float32 sum and count per sampled row)."""
    rows = max(s.init_sample, s.num_groups)
    return rows * s.dim * s.value_bytes, rows * (s.dim + 1) * 4


def gather_kmeans(s: Setup, world: int) -> KMeansCost:
    rows, row_bytes = world * cache_rows(s, world), s.dim * s.value_bytes
    sample, cells = seeding_bytes(s)
    peak = max(2 * rows * row_bytes, rows * (row_bytes + 12) + sample + cells)
    received = max((world - 1) * cache_rows(s, world) * row_bytes, s.num_groups * (row_bytes + 8) if world > 1 else 0)
    return KMeansCost(peak, received, passes(s) * rows * s.num_groups * s.dim)


def sharded_kmeans(s: Setup, world: int) -> KMeansCost:
    row_bytes = s.dim * s.value_bytes
    sample, cells = seeding_bytes(s)
    per_pass = s.num_groups * row_bytes + 8 * s.num_groups + 8
    received = ((world - 1) / world * sample + ring_allreduce(cells, world) + 2 * s.num_groups * row_bytes
                + passes(s) * ring_allreduce(per_pass, world))
    rows = cache_rows(s, world)
    return KMeansCost(rows * (row_bytes + 12) + sample + cells, received, passes(s) * rows * s.num_groups * s.dim)


def group_update(s: Setup, world: int) -> StepCost:
    payload = 8 * s.num_groups + 2 * s.num_groups * s.dim * s.value_bytes
    batch = s.global_batch / world
    return StepCost(payload, ring_allreduce(payload, world), 2 * GLOBAL_VIEWS * batch * s.num_groups * s.dim)


def traffic_crossover(s: Setup, limit: int = 1 << 20) -> int | None:
    """Smallest W at which ``gather``'s busiest rank receives more than ``sharded``'s."""
    return next((w for w in range(2, limit)
                 if gather_kmeans(s, w).received_bytes > sharded_kmeans(s, w).received_bytes), None)


def gather_fits(s: Setup, budget: float) -> bool:
    """Whether ``gather``'s peak on rank 0 stays within ``budget`` bytes: it holds the union, the same at any W."""
    return gather_kmeans(s, 1).peak_bytes <= budget


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n / size < 1000 else f"{n / size:,.0f} {unit}"
    return f"{n:.0f} B"


def human_count(n: float) -> str:
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f}"


def trainable_params(cfg: Config) -> int | None:
    """Parameters whose gradients DDP all-reduces every step (a reference scale), built on the meta device."""
    import torch

    from smog_scale.models.smog import SMoGModel

    mc = cfg.model
    try:
        with torch.device("meta"):
            model = SMoGModel(mc.backbone, mc.proj_hidden_dim, mc.proj_dim, mc.pred_hidden_dim, mc.backbone_kwargs)
    except Exception:  # noqa: BLE001 - the reference column is optional
        return None
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def setup_from(cfg: Config) -> Setup:
    from smog_scale.method import kmeans

    g = cfg.grouping
    return Setup(num_groups=g.num_groups, dim=cfg.model.proj_dim, cache_union=g.cache_size, kmeans_iters=g.kmeans_iters,
                 init_sample=inspect.signature(kmeans.fit).parameters["init_sample"].default,
                 global_batch=cfg.optim.global_batch_size, regroup_every=g.regroup_every)


def tables(s: Setup, worlds: Sequence[int], budget: float, params: int | None) -> str:
    lines = [
        f"K = {s.num_groups}, D = {s.dim}, cache union U = {s.cache_union} rows (C = U / W per rank), "
        f"{s.kmeans_iters} k-means iterations ({passes(s)} passes), seeding sample S = {s.init_sample} rows, "
        f"global batch {s.global_batch}, re-grouping every {s.regroup_every} steps, {s.value_bytes}-byte values.",
        "",
        "**k-means, per re-grouping**, on the busiest rank (rank 0 in `gather`; received = bytes it "
        "receives; per step = amortized over the re-grouping period)",
        "",
        "| GPUs | mode | union rows | peak memory | received | received / step | search multiply-adds |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for world in worlds:
        for mode, cost in (("gather", gather_kmeans(s, world)), ("sharded", sharded_kmeans(s, world))):
            over = " (over budget)" if cost.peak_bytes > budget else ""
            lines.append(f"| {world} | `{mode}` | {world * cache_rows(s, world):,} | "
                         f"{human_bytes(cost.peak_bytes)}{over} | "
                         f"{human_bytes(cost.received_bytes)} | {human_bytes(cost.received_bytes / s.regroup_every)} | "
                         f"{human_count(cost.busiest_macs)} |")
    ref = "DDP gradients received / rank / step (reference)"
    lines += [
        "",
        "**Grouping, every training step** (both modes)",
        "",
        f"| GPUs | batch / GPU | feature cache / rank | group-update all-reduce payload | received / rank "
        f"| label + assignment multiply-adds / rank | {ref} |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for world in worlds:
        step = group_update(s, world)
        ddp = human_bytes(ring_allreduce(params * s.value_bytes, world)) if params else "n/a"
        lines.append(f"| {world} | {s.global_batch // world} | {human_bytes(cache_bytes(s, world))} | "
                     f"{human_bytes(step.payload_bytes)} | {human_bytes(step.received_bytes)} | "
                     f"{human_count(step.label_macs)} | {ddp} |")
    peak = human_bytes(gather_kmeans(s, 1).peak_bytes)
    fits = (f"within the {human_bytes(budget)} budget at any W" if gather_fits(s, budget) else
            f"over the {human_bytes(budget)} budget at every W: use `sharded`")
    lines += [
        "",
        f"**Crossover.** `sharded`'s busiest rank receives less than `gather`'s from **W = {traffic_crossover(s)}** "
        f"GPUs on (gather's approaches U D v as (W-1)/W U D v, sharded's stays near "
        f"{human_bytes(sharded_kmeans(s, 1 << 20).received_bytes)}); `gather`'s peak (2 U D v, the union on rank 0) "
        f"is {peak}, {fits}.",
    ]
    if params:
        lines.append(f"(Reference: the model's {params / 1e6:.1f} M trainable parameters make DDP all-reduce "
                     f"{human_bytes(params * s.value_bytes)} of gradients every step.)")
    return "\n".join(lines)


def recipe_path(name: str) -> Path:
    """A recipe file, or the name of one in ``recipes/`` (``demo_cpu`` or ``demo_cpu.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    named = ROOT / "recipes" / (name if name.endswith(".yaml") else f"{name}.yaml")
    if named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")))
    raise ConfigError(f"no recipe {name!r}: give a recipe file or one of {known}")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of GPUs, got {text}")
    return value


def launch_error(cfg: Config, world: int) -> str | None:
    """Why the trainer refuses this recipe on ``world`` GPUs (a batch that does not split, K above the
    caches), or None."""
    try:
        derive(cfg, world, num_samples=cfg.optim.global_batch_size * max(1, cfg.data.num_workers))
    except ConfigError as err:
        return str(err)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="r50_800ep", help="recipe file or name in recipes/ whose sizes are used "
                                                              "(default: r50_800ep, global batch 4096)")
    parser.add_argument("--worlds", type=positive_int, nargs="+", metavar="W",
                        help=f"world sizes (GPUs); default: those of {DEFAULT_WORLDS} the recipe can run on")
    parser.add_argument("--budget-gib", type=float, default=4.0,
                        help="GPU memory k-means may take beside training (default 4 GiB: an 80 GB GPU keeps "
                             "the model, optimizer state and the allocator's cached activations resident)")
    parser.add_argument("--no-reference", action="store_true", help="skip the DDP gradient reference column")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(recipe_path(args.recipe), [])
    except ConfigError as err:
        print(f"scaling_table: error: {err}", file=sys.stderr)
        return 2
    refused = {world: launch_error(cfg, world) for world in args.worlds or DEFAULT_WORLDS}
    if args.worlds and any(refused.values()):
        print(f"scaling_table: error: {next(e for e in refused.values() if e)}", file=sys.stderr)
        return 2
    worlds = [world for world, error in refused.items() if error is None]
    if not worlds:
        print(f"scaling_table: error: {refused[DEFAULT_WORLDS[0]]}; pass --worlds", file=sys.stderr)
        return 2
    params = None if args.no_reference else trainable_params(cfg)
    print(tables(setup_from(cfg), worlds, args.budget_gib * 2**30, params))
    if len(worlds) < len(refused):
        print(f"\n(Not shown, the trainer refuses them: {'; '.join(e for e in refused.values() if e)}.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
