"""What a training step costs: the trainer against the plain loop doing the same work, and the grouping's share.

    python benchmarks/bench_step.py [--scales small demo] [--runs 3] [--threads 2]   # trainer vs plain loop
    python benchmarks/bench_step.py grouping                                         # SMoG vs BYOL step, demo scale
    python benchmarks/bench_step.py grouping --device cuda --backbone resnet50 --size 224 --batch 256 \\
        --groups 3000 --dim 128 --hidden 4096 --bf16                                 # paper scale, per GPU

**Trainer vs plain loop** (issue 22). The trainer is ``smog_scale/train.py RECIPE`` as users run it, on one
process: Accelerate, its loader over the shards (``data.num_workers`` as the recipe or the default sets it),
the step's finiteness check, skipped-step snapshot, accumulator, health signals and its log steps. The plain
loop is ``plain_loop.py``: the shortest correct PyTorch loop with no Accelerate and no bookkeeping.

The same work, on both sides: the same JPEG bytes (the plain loop reads the training shards' images into
memory first, the trainer streams the shards; both draw images uniformly with replacement), decoded and
cropped by the same code (the recipe's ``MultiCrop``; the plain loop in its own process between steps), the
same networks from the same seed, the same objective math (the package's labels, assignments, synchronous
group update, group contrast loss, G commit, cache push and EMA), the same optimizer with the same
parameter groups and the same lr / beta / m schedules, the loss read on the log steps. Left out of
both: re-grouping (``grouping.regroup_every=0``, ``grouping.reset_momentum=false``: k-means is a periodic
event, ``bench_kmeans.py`` times it), the kNN monitor and checkpoints (the trainer's one save comes after the
timed steps). Scales: ``small`` is ``recipes/small_32px.yaml`` on the 32-px digits (written under
``--data`` on first use, as ``bench_learning.py`` does), ``demo`` is ``recipes/demo_cpu.yaml`` on the demo
images (``make demo``'s). Both loops log every 5 steps (``run.log_every=5``); a run times the steps after
its warm-up up to its last step, both log steps, with the trainer's ``metrics.jsonl`` timestamps and the
plain loop's clock (short windows: the benchmark machine is small and shared). Every run is its own process
with ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` fixed to ``--threads``; the loops alternate (the first of each
round alternates too) so that drift in the machine's load hits both; the table gives each run, the medians
and their ratio, with the conditions (date, CPU, threads, ``OPENBLAS_CORETYPE``, load average).

**Grouping** (``grouping``): a SMoG step against the same networks' BYOL step (the trainer's
``model.objective: byol``: no grouping), alternating in one process on random uint8 crops.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import plain_loop  # noqa: E402  (benchmarks/, on sys.path as this script's folder)

from smog_scale.config.derived import derive  # noqa: E402
from smog_scale.config.validation import load_config  # noqa: E402
from smog_scale.data.converter.make_shards import ConvertOptions, convert  # noqa: E402
from smog_scale.data.multicrop import normalize  # noqa: E402
from smog_scale.data.synthetic.demo import write_demo  # noqa: E402
from smog_scale.data.synthetic.digits32 import write_digits32  # noqa: E402
from smog_scale.method.feature_cache import FeatureCache  # noqa: E402
from smog_scale.method.grouping import GroupBank  # noqa: E402
from smog_scale.method.objectives import byol_step, grouping_step  # noqa: E402
from smog_scale.models.smog import SMoGModel  # noqa: E402

# --- trainer vs plain loop ---


@dataclass(frozen=True)
class Scale:
    """A recipe, where its shards come from, and the timed window: steps ``warmup + 1 .. steps`` (log steps)."""

    recipe: Path
    shards: Callable[[Path], Path]
    warmup: int
    steps: int


def small_shards(data: Path) -> Path:
    """The 32-px digits' training shards under ``data/small`` (written on first use)."""
    if not (data / "small" / "shards" / "val" / "manifest.json").is_file():
        write_digits32(data / "small")
    return data / "small" / "shards" / "train"


def demo_shards(data: Path) -> Path:
    """The demo images' training shards under ``data/demo`` (``make demo``'s 320 images, written on first use)."""
    shards = data / "demo" / "shards"
    if not (shards / "manifest.json").is_file():
        if not (data / "demo" / "images" / "train").is_dir():
            write_demo(data / "demo" / "images")
        convert(data / "demo" / "images" / "train", shards, ConvertOptions(prefix="train", samples_per_shard=40),
                progress=False)
    return shards


SCALES = {
    "small": Scale(ROOT / "recipes" / "small_32px.yaml", small_shards, warmup=5, steps=15),
    "demo": Scale(ROOT / "recipes" / "demo_cpu.yaml", demo_shards, warmup=5, steps=15),
}


def same_work(shards: Path, steps: int) -> list[str]:
    """The recipe overrides both loops run with (see the module docstring)."""
    return [f"data.train_shards={shards}", f"run.max_steps={steps}", f"run.save_every={steps}", "run.log_every=5",
            "grouping.regroup_every=0", "grouping.reset_momentum=false", "monitor.knn_every_epochs=0"]


def run_env(threads: int) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def trainer_run(scale: Scale, shards: Path, threads: int) -> float:
    """Seconds per step of ``smog_scale/train.py`` over the scale's window, from its ``metrics.jsonl``."""
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        run = Path(tmp) / "run"
        command = [sys.executable, str(ROOT / "smog_scale" / "train.py"), str(scale.recipe),
                   *same_work(shards, scale.steps), f"run.output_dir={run}"]
        done = subprocess.run(command, env=run_env(threads), capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the trainer failed ({done.returncode}):\n{done.stderr[-3000:]}")
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in records if "loss" in r}
    return (times[scale.steps] - times[scale.warmup]) / (scale.steps - scale.warmup)


def plain_run(scale: Scale, shards: Path, threads: int) -> float:
    """Seconds per step of ``plain_loop.py`` over the scale's window, in a process of its own."""
    command = [sys.executable, __file__, "plain-worker", str(scale.recipe), str(shards),
               str(scale.warmup), str(scale.steps)]
    done = subprocess.run(command, env=run_env(threads), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the plain loop failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return float(done.stdout.split()[-1])


def plain_worker(recipe: str, shards: str, warmup: str, steps: str) -> None:
    cfg = load_config(recipe, same_work(Path(shards), int(steps)))
    derived = derive(cfg, 1)
    images = plain_loop.load_images(Path(shards))
    print(plain_loop.seconds_per_step(cfg, derived, images, int(steps), int(warmup)))


def conditions(threads: int) -> str:
    """Date, CPU, thread and BLAS settings and the load average, for the table's header."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{time.strftime('%Y-%m-%d %H:%M')}, {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"OMP_NUM_THREADS={threads}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}, "
            f"load average (1 / 5 / 15 min) {load}")


def compare_loops(args: argparse.Namespace) -> None:
    print(conditions(args.threads), flush=True)
    rows = []
    for name in args.scales:
        scale = SCALES[name]
        shards = scale.shards(args.data)
        batch = load_config(scale.recipe).optim.global_batch_size
        times: dict[str, list[float]] = {"plain loop": [], "trainer": []}
        for run in range(args.runs):
            order = ["plain loop", "trainer"] if run % 2 == 0 else ["trainer", "plain loop"]
            for loop in order:
                timer = plain_run if loop == "plain loop" else trainer_run
                times[loop].append(timer(scale, shards, args.threads))
                print(f"{name} run {run + 1}: {loop} {times[loop][-1]:.3f} s/step", flush=True)
        base = statistics.median(times["plain loop"])
        for loop, values in times.items():
            median = statistics.median(values)
            runs = " / ".join(f"{v:.3f}" for v in values)
            rows.append(f"| {name} ({scale.recipe.name}) | {loop} | {runs} | {median:.3f} | {batch / median:.1f} "
                        f"| {median / base:.3f}x |")
    print(f"after: {conditions(args.threads)}")
    print("| scale | loop | s/step, runs in order | median s/step | images/s | vs plain loop |")
    print("|---|---|---|---:|---:|---:|")
    print("\n".join(rows))


# --- grouping: SMoG step vs BYOL step ---


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


def byol_control_step(model, optimizer, bank, cache, images, autocast) -> None:
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


def compare_grouping(args: argparse.Namespace) -> None:
    parts = build(args)
    images = torch.randint(0, 256, (2, args.batch, 3, args.size, args.size), dtype=torch.uint8, device=args.device)
    autocast = (lambda: torch.autocast(args.device, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    steps = {"plain two-view": byol_control_step, "SMoG": smog_step}
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


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plain-worker"]:
        plain_worker(*argv[1:])
        return
    if argv[:1] != ["grouping"]:
        argv.insert(0, "loops")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    loops = modes.add_parser("loops", help="the trainer against the plain loop (default)")
    loops.add_argument("--scales", nargs="+", choices=SCALES, default=list(SCALES))
    loops.add_argument("--runs", type=int, default=3, help="runs of each loop per scale (median)")
    loops.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run")
    loops.add_argument("--data", type=Path, default=Path("bench_out"), help="data sets (written if missing)")
    loops.set_defaults(func=compare_loops)
    grouping = modes.add_parser("grouping", help="a SMoG step against the same networks' BYOL step")
    grouping.add_argument("--device", default="cpu")
    grouping.add_argument("--backbone", default="resnet18")
    grouping.add_argument("--size", type=int, default=64)
    grouping.add_argument("--batch", type=int, default=32)
    grouping.add_argument("--groups", type=int, default=30)
    grouping.add_argument("--dim", type=int, default=64)
    grouping.add_argument("--hidden", type=int, default=512)
    grouping.add_argument("--cache", type=int, default=640)
    grouping.add_argument("--bf16", action="store_true")
    grouping.add_argument("--repeats", type=int, default=15)
    grouping.add_argument("--warmup", type=int, default=3)
    grouping.set_defaults(func=compare_grouping)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
