"""Does SMoG learn on small data? kNN curves of SMoG, its BYOL control, two SimCLRs, random init and raw pixels.

    python benchmarks/bench_learning.py [key=value ...] [--data DIR] [--out DIR] [--steps 1500] [--every 250]
                                        [--simclr-steps 750] [--seeds 0 1 2] [--methods smog byol simclr lightly]

(recipe overrides first: ``--seeds`` and ``--methods`` take every word after them)

Data: ``python -m smog_scale.data.synthetic.digits32`` (written under ``--data`` on first use): 32-px digits,
1,437 train and 360 held-out images of 10 classes whose colours vary as the augmentation varies them. Rows:

- **SMoG** and the **BYOL control** go through the user's pipeline: ``smog_scale/train.py recipes/small_32px.yaml``
  on one CPU process (``model.objective=byol`` for the control; ``key=value`` overrides go to both), ``--steps``
  steps, whose kNN monitor logs the online backbone's weighted kNN top-1 every ``--every`` steps;
- **SimCLR, lightly**: the public ``lightly`` package's SimCLR in the standard small recipe (``lightly_simclr.py``),
  the positive control: if it does not learn, the benchmark, not SMoG, is at fault;
- **SimCLR, ours**: the same recipe through the project's own augmentation, backbone, optimizer and schedule
  (``simclr_reference.py``): it should match the lightly row within the seed spread;
- the same backbone at **random init** with torch seeds ``--seeds`` (shown at step 0 of the trained rows too), that
  backbone with its **BatchNorm statistics re-estimated** on the train split (``BN_BATCHES`` batches, no weight
  update), as a trained row's eval mode has statistics of the data, and kNN on the **raw pixels**.

Every row is scored with one protocol, ``tools/knn_eval.py``'s: weighted kNN (k = 20, T = 0.07) of the held-out
split against the train split, both read by ``build_eval_loader`` at their own 32 px (no zoom). The bar is the
**better baseline**: per seed, the better of the two random-init rows. Prints a Markdown table (mean +- std over
seeds at each step), each method's gain over the better baseline at its last step (mean and the worst seed), and
writes ``OUT/learning.json`` and ``OUT/learning.png``. Runs one training at a time with ``OMP_NUM_THREADS=2``
(unless the caller sets it); finished runs are reused, so an interrupted benchmark resumes, and benchmarks over
different ``--seeds`` / ``--methods`` with the same ``--out`` can run side by side before a last call gathers the
table. Needs the ``bench`` extra (lightly).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from itertools import islice
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lightly_simclr  # noqa: E402  (benchmarks/, on sys.path as this script's folder)
import simclr_reference  # noqa: E402

from smog_scale.config.derived import derive  # noqa: E402
from smog_scale.config.validation import load_config  # noqa: E402
from smog_scale.data.shards import build_eval_loader  # noqa: E402
from smog_scale.eval.batchnorm import reestimate_batchnorm  # noqa: E402
from smog_scale.eval.knn import knn_evaluate  # noqa: E402
from smog_scale.models.backbone import build_backbone  # noqa: E402

RECIPE = ROOT / "recipes" / "small_32px.yaml"
NAMES = {"smog": "SMoG", "byol": "BYOL control", "simclr": "SimCLR, ours", "lightly": "SimCLR, lightly"}
REFERENCES = {"simclr": simclr_reference.train, "lightly": lightly_simclr.train}  # trained in this process
SIZE = 32
BN_BATCHES, BN_BATCH_SIZE = 5, 256  # the "random init, BN re-estimated" row: statistics of the first 1,280 train images
RANDOM, RANDOM_BN = "random init", "random init, BN re-estimated"


def shards(data: Path) -> tuple[Path, Path]:
    train, val = data / "shards" / "train", data / "shards" / "val"
    if not (val / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "smog_scale.data.synthetic.digits32", str(data)], check=True, cwd=ROOT)
    return train, val


def train_curve(data: Path, run: Path, method: str, seed: int, steps: int, every: int,
                overrides: Sequence[str]) -> dict[int, float]:
    """kNN top-1 of the (online) backbone at every ``every`` steps of one training run (trained if not yet)."""
    metrics = run / "metrics.jsonl"
    if not (run / "done").is_file():
        train, val = shards(data)
        cfg = load_config(RECIPE, [f"data.train_shards={train}", *overrides])
        run.mkdir(parents=True, exist_ok=True)
        if metrics.exists():
            metrics.unlink()  # an interrupted run starts over: its curve must come from one run
        if method in REFERENCES:
            REFERENCES[method](data / "images" / "train", run, seed, steps, every, cfg.model.backbone,
                               dict(cfg.model.backbone_kwargs), lambda backbone: knn_top1(backbone, train, val))
        else:
            per_epoch = derive(cfg, 1, cfg.data.num_samples or 0).steps_per_epoch
            if steps % per_epoch or every % per_epoch:
                raise SystemExit(f"--steps and --every must be multiples of the recipe's {per_epoch} steps per epoch")
            settings = [f"run.output_dir={run}", f"data.train_shards={train}", f"run.seed={seed}",
                        f"optim.epochs={steps // per_epoch}", f"monitor.knn_every_epochs={every // per_epoch}",
                        f"monitor.knn_train_shards={train}", f"monitor.knn_val_shards={val}", "run.resume=never",
                        "run.overwrite=true",
                        f"model.objective={method}", *overrides]
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            env.setdefault("OMP_NUM_THREADS", "2")
            with open(run.parent / f"{run.name}.log", "w") as log:
                subprocess.run([sys.executable, str(ROOT / "smog_scale" / "train.py"), str(RECIPE), *settings],
                               check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
        (run / "done").touch()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {r["step"]: r["knn_top1"] for r in records if r.get("event") == "knn"}


def features(model: torch.nn.Module | None, urls: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm features of ``model`` (None: the raw pixels) on the evaluation view, with the labels."""
    feats, labels = [], []
    with torch.no_grad():
        for images, batch_labels, _ in build_eval_loader(str(urls), image_size=SIZE, batch_size=256, num_workers=1):
            feats.append((images if model is None else model(images)).flatten(1))
            labels.append(batch_labels)
    return torch.nn.functional.normalize(torch.cat(feats), dim=1), torch.cat(labels)


def random_backbone(train: Path, seed: int) -> torch.nn.Module:
    """The recipe's backbone at random init with torch seed ``seed``, in eval mode."""
    cfg = load_config(RECIPE, [f"data.train_shards={train}"])
    torch.manual_seed(seed)
    return build_backbone(cfg.model.backbone, **cfg.model.backbone_kwargs).eval()


def reference(data: Path, seed: int | None) -> float:
    """kNN top-1 of the recipe's backbone at random init with torch seed ``seed`` (None: raw pixels)."""
    train, val = shards(data)
    return knn_top1(None if seed is None else random_backbone(train, seed), train, val)


def reference_bn(data: Path, seed: int, batches: int = BN_BATCHES) -> float:
    """kNN top-1 of the backbone of ``reference(data, seed)`` after ``reestimate_batchnorm`` on the first
    ``batches`` batches of the train split's evaluation views (``tools/knn_eval.py --random-init --bn-batches``)."""
    train, val = shards(data)
    model = random_backbone(train, seed)
    loader = build_eval_loader(str(train), image_size=SIZE, batch_size=BN_BATCH_SIZE, num_workers=1)
    reestimate_batchnorm(model, (images for images, *_ in islice(loader, batches)))
    return knn_top1(model, train, val)


def knn_top1(model: torch.nn.Module | None, train: Path, val: Path) -> float:
    """Weighted kNN top-1 of ``model``'s features (None: raw pixels) of the ``val`` shards against ``train``."""
    return knn_evaluate(*features(model, train), *features(model, val))["knn_top1"]


def summary(values: Sequence[float]) -> str:
    return f"{statistics.mean(values):.1f}" + (f" +- {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def table(curves: dict[str, dict[int, list[float]]], steps: Sequence[int]) -> str:
    lines = ["| features | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    for name, curve in curves.items():
        lines.append(f"| {name} | " + " | ".join(summary(curve[s]) if s in curve else "" for s in steps) + " |")
    return "\n".join(lines)


def gains(curves: dict[str, dict[int, list[float]]], methods: Sequence[str]) -> list[str]:
    """Per trained row, its gain at its last step over the better baseline of each seed: mean and worst seed."""
    better = [max(pair) for pair in zip(curves[RANDOM][0], curves[RANDOM_BN][0])]
    lines = [f"better baseline (per seed, the better random-init row): {summary(better)}"]
    for method in methods:
        curve = curves[NAMES[method]]
        last = max(curve)
        delta = [value - base for value, base in zip(curve[last], better)]
        lines.append(f"{NAMES[method]} at step {last}: {summary(curve[last])}, gain over the better baseline "
                     f"{statistics.mean(delta):+.1f} (worst seed {min(delta):+.1f})")
    return lines


def plot(curves: dict[str, dict[int, list[float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        xs = sorted(curve)
        means = [statistics.mean(curve[x]) for x in xs]
        spread = [statistics.stdev(curve[x]) if len(curve[x]) > 1 else 0.0 for x in xs]
        ax.errorbar(xs, means, yerr=spread, marker="o", capsize=3, label=name)
    ax.set(xlabel="optimizer steps", ylabel="kNN top-1 (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("bench_out/digits32"), help="the set (built if missing)")
    parser.add_argument("--out", type=Path, default=Path("bench_out/learning"), help="runs, JSON and PNG")
    parser.add_argument("--steps", type=int, default=1500, help="steps of the SMoG and BYOL rows")
    parser.add_argument("--simclr-steps", type=int, default=750, help="steps of the two SimCLR rows")
    parser.add_argument("--every", type=int, default=250, help="kNN every N steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=NAMES, default=list(NAMES))
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for the SMoG and BYOL rows")
    args = parser.parse_args(argv)
    steps = list(range(0, max(args.steps, args.simclr_steps) + 1, args.every))
    random_init = {seed: reference(args.data, seed) for seed in args.seeds}
    curves: dict[str, dict[int, list[float]]] = {}
    for method in args.methods:
        length = args.simclr_steps if method in REFERENCES else args.steps
        curve: dict[int, list[float]] = {0: list(random_init.values())}
        for seed in args.seeds:
            run = args.out / f"{method}_s{seed}"
            overrides = [] if method in REFERENCES else args.overrides
            for step, top1 in train_curve(args.data, run, method, seed, length, args.every, overrides).items():
                curve.setdefault(step, []).append(top1)
        curves[NAMES[method]] = curve
    curves[RANDOM] = {s: list(random_init.values()) for s in steps}
    curves[RANDOM_BN] = dict.fromkeys(steps, [reference_bn(args.data, seed) for seed in args.seeds])
    pixels = reference(args.data, None)
    curves["raw pixels"] = {s: [pixels] for s in steps}
    args.out.mkdir(parents=True, exist_ok=True)
    title = f"digits32, {len(args.seeds)} seed(s)" + (f", {' '.join(args.overrides)}" if args.overrides else "")
    (args.out / "learning.json").write_text(json.dumps({"title": title, "curves": curves}, indent=1))
    plot(curves, args.out / "learning.png", title)
    print(title)
    print(table(curves, steps))
    print("\n".join(gains(curves, args.methods)))
    print(f"wrote {args.out / 'learning.json'} and {args.out / 'learning.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
