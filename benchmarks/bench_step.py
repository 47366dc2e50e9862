"""Cost of the grouping in a full training step: a SMoG step vs the same backbone's plain two-view step.

Both steps run the same networks (online backbone + projector + predictor, momentum backbone +
projector), the same batch, optimizer and EMA; the plain step replaces grouping and group contrast
with BYOL's cosine loss (2 - 2 cos(p, e)). They alternate in one process, and the table gives
medians, the overhead ratio and images/s.

    python benchmarks/bench_step.py                                  # demo scale, CPU (demo_cpu.yaml)
    python benchmarks/bench_step.py --device cuda --backbone resnet50 --size 224 --batch 256 \\
        --groups 3000 --dim 128 --hidden 4096 --bf16                 # paper scale, per GPU
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from smog_scale.data.multicrop import normalize
from smog_scale.method.feature_cache import FeatureCache
from smog_scale.method.grouping import GroupBank
from smog_scale.method.objectives import byol_step, grouping_step
from smog_scale.models.smog import SMoGModel


def build(args: argparse.Namespace) -> tuple[SMoGModel, torch.optim.Optimizer, GroupBank, FeatureCache]:
    torch.manual_seed(0)
    model = SMoGModel(args.backbone, args.hidden, args.dim, args.hidden).to(args.device)
    if args.device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    bank = GroupBank(args.groups, args.dim).to(args.device)
    return model, optimizer, bank, FeatureCache(args.cache, args.dim).to(args.device)


def smog_step(model, optimizer, bank, cache, images, autocast) -> None:
    with autocast():
        out = model([normalize(images)])
    result = grouping_step(out, bank.groups, beta=0.99, tau=0.1)
    optimizer.zero_grad(set_to_none=True)
    result.loss.backward()
    optimizer.step()
    bank.commit(result.new_groups, result.ok)
    cache.push(result.cache_feats, ok=result.ok)
    model.update_momentum(0.99)


def plain_step(model, optimizer, bank, cache, images, autocast) -> None:
    with autocast():
        out = model([normalize(images)])
    loss = byol_step(out).loss  # the trainer's BYOL control (model.objective: byol)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.update_momentum(0.99)


def timed(step, parts, images, autocast, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(*parts, images, autocast)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--groups", type=int, default=30)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--cache", type=int, default=640)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    parts = build(args)
    images = torch.randint(0, 256, (2, args.batch, 3, args.size, args.size), dtype=torch.uint8, device=args.device)
    autocast = (lambda: torch.autocast(args.device, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    steps = {"plain two-view": plain_step, "SMoG": smog_step}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.repeats):
        for name, step in steps.items():  # alternate, so drift in machine load hits both alike
            t = timed(step, parts, images, autocast, args.device)
            if i >= args.warmup:
                times[name].append(t)
    print(f"torch {torch.__version__}, {args.device}, {args.backbone} @ {args.size}px, batch {args.batch} x 2 views, "
          f"K={args.groups}, D={args.dim}, {'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    base = statistics.median(times["plain two-view"])
    print(f"{'step':<16} | {'ms':>9} | {'images/s':>9} | {'vs plain':>8}\n" + "-" * 51)
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<16} | {1e3 * median:>9.1f} | {args.batch / median:>9.1f} | {median / base:>7.3f}x")
    print(f"grouping overhead: {100 * (statistics.median(times['SMoG']) / base - 1):+.1f}%")


if __name__ == "__main__":
    main()
