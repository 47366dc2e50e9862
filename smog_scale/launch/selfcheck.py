"""Is this machine ready for a recipe? ``python tools/selfcheck.py RECIPE [dotted.key=value ...] [--out DIR]``.

Run it as the long job will run (``accelerate launch [the job's options] tools/selfcheck.py ...``): the
checks use the recipe's backbone and the launch's precision, world size and DeepSpeed setting on tiny
demo shards. They drive the trainer through its command line (``smog_scale/train.py``'s ``main(argv)``:
exit codes, ``metrics.jsonl``, checkpoints), so they follow it as it changes. ``DIR`` (default
``selfcheck``, on a filesystem every node sees) has its ``images``, ``shards``, ``run``, ``monitor``,
``probe``, ``full`` and ``export`` replaced.

``CHECKS``, in order (one that needs a check that did not pass is skipped): a few steps with a
re-grouping every 2 steps (k-means and its logging), the checkpoint, a resume, the pre-emption signal
(SIGUSR1 mid-run: save, exit 0), export to timm and a reload on the device, the kNN monitor, a skipped
step leaving no gradients behind (``skip_probe``), DeepSpeed's checkpoint format when the launch uses
DeepSpeed, k-means with faiss on the GPU, 4 steps at the recipe's full per-device batch with the peak
memory against ``tools/memory.py``'s estimate, and images/s per device. The main process prints a table (check, ok,
seconds, detail) and writes ``DIR/selfcheck.json``, a list of ``{"check", "ok", "seconds", "detail"}``
with ``ok`` true, false, or null for a skipped check (the detail says why). Exit code 1 if a check
failed, 2 for a bad recipe or one this launch refuses (``training.cpu_bf16``), before any check, else 0.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import runpy
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import timm
import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, parse_flag_from_env

from smog_scale.config.recipe_file import ConfigError
from smog_scale.config.schema import Config
from smog_scale.config.validation import crop_specs, load_config
from smog_scale.data.converter.make_shards import ConvertOptions, convert
from smog_scale.data.synthetic.demo import write_demo
from smog_scale.launch import memory_estimate, skip_probe
from smog_scale.launch.selfcheck_runner import Check, Failed, Skipped, run_checks, table
from smog_scale.method import centroid_search, kmeans
from smog_scale.training import cpu_bf16
from smog_scale.training.loop import make_accelerator

STEPS = 4  # the first run; re-grouping every 2 steps, so k-means runs twice
BATCH_PER_DEVICE = 8  # for every run but the full-batch one
PREEMPT_WINDOW = 50  # steps the pre-emption run may take; a signal that does not stop it fails the check
TOOLS = Path(__file__).resolve().parents[2] / "tools"
TRAINER = Path(__file__).resolve().parents[1] / "train.py"  # run as the script it is, never imported


@dataclass
class Context:
    """What the checks share: the recipe, the launch and what earlier checks found."""

    recipe: str
    overrides: list[str]
    out: Path
    cfg: Config
    found: dict[str, Any] = field(default_factory=dict)

    @property
    def launch(self) -> PartialState:
        return _launch_state()

    @property
    def world(self) -> int:
        return self.launch.num_processes

    @property
    def main(self) -> bool:
        return self.launch.is_main_process

    @property
    def precision(self) -> memory_estimate.Precision:
        """The autocast precision of this launch: the recipe's, else accelerate's flag."""
        chosen: str = self.cfg.run.mixed_precision
        if chosen == "launcher":
            chosen = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        return "bf16" if chosen == "bf16" else "fp16" if chosen == "fp16" else "no"

    def small(self) -> list[str]:
        """Overrides for the short runs: 8 images per device, K = 16, a re-grouping every 2 steps (the first
        after step 1: one cached row per group is enough here)."""
        global_batch = BATCH_PER_DEVICE * self.world * self.cfg.optim.grad_accum_steps
        return [f"optim.global_batch_size={global_batch}", "grouping.num_groups=16", "grouping.regroup_every=2",
                "grouping.min_rows_per_group=1", *self.epoch_of(global_batch)]

    def epoch_of(self, global_batch: int) -> list[str]:
        """Enough samples per epoch for every loader worker (shards are drawn with replacement)."""
        workers = max(1, self.cfg.data.num_workers)
        return [f"data.num_samples={global_batch * workers * 64}", "data.shuffle_buffer=64"]

    def train(self, run: str, *overrides: str) -> None:
        """The trainer's ``main`` on the demo shards into ``DIR/run``; Failed unless it exits 0 (on any rank)."""
        argv = [self.recipe, *self.overrides, f"data.train_shards={self.out / 'shards'}",
                f"run.output_dir={self.out / run}", "run.trackers=[]", "run.log_every=1", "run.save_every=100000",
                "monitor.knn_every_epochs=0", *overrides]
        # Each run as in a fresh process, but for the process group: the trainer ends with Accelerate's
        # end_training, which destroys it, and the runs that follow (and the checks' own collectives) need
        # it, so it is kept until the self-check ends; the rest of Accelerate's shared state (the DeepSpeed
        # config a run filled in for its batch, the accumulation state) is reset after each run.
        try:
            with _signal_handlers_kept(), mock.patch.object(PartialState, "destroy_process_group",
                                                                    lambda *_: None):
                code = runpy.run_path(str(TRAINER))["main"](argv)
        finally:
            AcceleratorState._reset_state()
            GradientState._reset_state()
        if code != 0:
            raise Failed(f"the trainer exited {code} (its error is printed above)")

    def records(self, run: str) -> list[dict[str, Any]]:
        """``DIR/run/metrics.jsonl`` as written so far (a line being written is left out)."""
        path = self.out / run / "metrics.jsonl"
        records = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def messages(self, run: str) -> list[str]:
        return [r["message"] for r in self.records(run) if "message" in r]

    def newest_step(self, run: str) -> int:
        saved = sorted((self.out / run / "checkpoints").glob("step_*"))
        if not saved:
            raise Failed(f"no checkpoint in {self.out / run / 'checkpoints'}")
        return json.loads((saved[-1] / "trainer_state.json").read_text())["global_step"]


def _launch_state() -> PartialState:
    """This launch's processes (CPU ranks too: Accelerator reads ACCELERATE_USE_CPU, PartialState does not)."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


@contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """The trainer installs SIGTERM/SIGUSR1 handlers bound to its run; put the previous ones back."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _trained(ctx: Context, run: str, steps: int) -> list[float]:
    losses = [r["loss"] for r in ctx.records(run) if "loss" in r]
    if len(losses) < steps or not all(map(math.isfinite, losses)):
        raise Failed(f"expected {steps} finite losses in metrics.jsonl, found {losses}")
    return losses


# ---- the checks: each returns its detail, or raises Skipped / Failed. Collective checks run on every
# rank and inspect files on the main process only (the others return "").


def environment(ctx: Context) -> str:
    device = ctx.launch.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    deepspeed = ctx.launch.distributed_type == DistributedType.DEEPSPEED
    return (f"torch {torch.__version__}, {ctx.world} process(es) on {name}, precision {ctx.precision}, "
            f"DeepSpeed {'yes' if deepspeed else 'no'}, k-means search {centroid_search.describe()}")


def demo_shards(ctx: Context) -> str:
    """Replace DIR's check folders; the main process writes 160 demo images into 8 shards."""
    try:
        if ctx.main:
            for name in ("images", "shards", "run", "monitor", "probe", "full", "export"):
                shutil.rmtree(ctx.out / name, ignore_errors=True)
            write_demo(ctx.out / "images", train_per_class=16, val_per_class=0)
            manifest = convert(ctx.out / "images" / "train", ctx.out / "shards", ConvertOptions(samples_per_shard=20),
                               progress=False)
    finally:
        ctx.launch.wait_for_everyone()
    return f"{manifest['num_samples']} demo images in {len(manifest['shards'])} shards" if ctx.main else ""


def train_steps(ctx: Context) -> str:
    ctx.train("run", *ctx.small(), f"run.max_steps={STEPS}")
    if not ctx.main:
        return ""
    losses = _trained(ctx, "run", STEPS)
    regrouped = [r["step"] for r in ctx.records("run") if r.get("event") == "regroup"]
    if not regrouped:
        raise Failed(f"no re-grouping logged in {STEPS} steps (k-means did not run): {ctx.messages('run')}")
    return (f"{STEPS} steps at {BATCH_PER_DEVICE} images per device, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
            f"k-means at steps {regrouped}")


def checkpoint_written(ctx: Context) -> str:
    folder = ctx.out / "run" / "checkpoints"
    saved, partial = sorted(folder.glob("step_*")), sorted(folder.glob(".tmp-*"))
    if not saved or partial or ctx.newest_step("run") != STEPS:
        raise Failed(f"expected one complete checkpoint of step {STEPS} in {folder}, found {saved + partial}")
    files = [p for p in saved[-1].rglob("*") if p.is_file()]
    caches = [p for p in files if p.name.startswith("cache_rank")]
    if len(caches) != ctx.world:
        raise Failed(f"{saved[-1].name} holds {len(caches)} feature caches for {ctx.world} ranks")
    size = sum(p.stat().st_size for p in files) / 2**20
    return f"{saved[-1].name}: {len(files)} files, {size:.1f} MiB, the feature caches of {ctx.world} rank(s)"


def resume(ctx: Context) -> str:
    ctx.train("run", *ctx.small(), f"run.max_steps={STEPS + 2}")
    if not ctx.main:
        return ""
    _trained(ctx, "run", STEPS + 2)
    resumed = [m for m in ctx.messages("run") if m.startswith("resumed from")]
    if not resumed or ctx.newest_step("run") != STEPS + 2:
        raise Failed(f"expected a resume to step {STEPS + 2}; messages: {ctx.messages('run')}")
    return f"{resumed[-1]}, trained on to step {STEPS + 2}"


def preemption(ctx: Context) -> str:
    """SIGUSR1 to the main process after its first step: every rank must save and the run exit 0."""
    start, stop = STEPS + 2, threading.Event()

    def signal_after_a_step() -> None:
        while not stop.wait(0.2):
            if any(r.get("step", 0) > start for r in ctx.records("run") if "loss" in r):
                os.kill(os.getpid(), signal.SIGUSR1)
                return

    if ctx.main:
        threading.Thread(target=signal_after_a_step, daemon=True).start()
    try:
        ctx.train("run", *ctx.small(), f"run.max_steps={start + PREEMPT_WINDOW}")
    finally:
        stop.set()
    if not ctx.main:
        return ""
    saved, stopped = ctx.newest_step("run"), any(m.startswith("stop requested") for m in ctx.messages("run"))
    if not stopped or not start < saved < start + PREEMPT_WINDOW:
        raise Failed(f"the signal did not stop the run: newest checkpoint step {saved}, {ctx.messages('run')[-2:]}")
    return f"SIGUSR1 after step {start + 1}: checkpoint of step {saved}, exit code 0"


def export(ctx: Context) -> str:
    size = crop_specs(ctx.cfg)[0].size
    code = runpy.run_path(str(TOOLS / "export_timm.py"))["main"](
        [str(ctx.out / "run"), str(ctx.out / "export"), "--check-size", str(size)])
    if code != 0:
        raise Failed(f"tools/export_timm.py exited {code} (its error is printed above)")
    device = ctx.launch.device
    model = timm.create_model(f"local-dir:{(ctx.out / 'export').resolve()}", pretrained=True, num_classes=0)
    with torch.no_grad():
        features = model.to(device).eval()(torch.randn(2, 3, size, size, device=device))
    if not torch.isfinite(features).all():
        raise Failed("the reloaded backbone gives non-finite features")
    return f"{ctx.cfg.model.backbone} exported, reloaded through timm on {device}: features {list(features.shape)}"


def knn_monitor(ctx: Context) -> str:
    """2 steps with the kNN monitor on the demo shards (under DeepSpeed the online backbone is bf16/fp16)."""
    shards, size = ctx.out / "shards", crop_specs(ctx.cfg)[0].size
    ctx.train("monitor", *ctx.small(), "run.max_steps=2", f"monitor.knn_train_shards={shards}",
              f"monitor.knn_val_shards={shards}", f"monitor.image_size={size}", "monitor.knn_every_epochs=1",
              f"monitor.batch_size={BATCH_PER_DEVICE}")
    if not ctx.main:
        return ""
    knn = [r for r in ctx.records("monitor") if r.get("event") == "knn"]
    if not knn or not 0 <= knn[-1]["knn_top1"] <= 100:
        raise Failed(f"no kNN accuracy logged after 2 steps: {ctx.messages('monitor')[-2:]}")
    return f"kNN top-1 {knn[-1]['knn_top1']:.1f}% on the demo shards after step {knn[-1]['step']}"


def skipped_step(ctx: Context) -> str:
    """A step with a non-finite micro-batch, then a clean one, against the clean one alone (skip_probe)."""
    cfg = load_config(ctx.recipe, [*ctx.overrides, f"data.train_shards={ctx.out / 'shards'}", "run.trackers=[]",
                                   f"run.output_dir={ctx.out / 'probe'}", *ctx.small(), "optim.grad_accum_steps=2",
                                   f"optim.global_batch_size={2 * BATCH_PER_DEVICE * ctx.world}"])
    difference, change = skip_probe.skipped_step_difference(cfg, make_accelerator)
    if not change or difference > 0.01 * change:  # a leaked step is as large as a step; kernels' rounding is not
        raise Failed(f"the skipped step left gradients behind: weights off by {difference:.2e} (a step: {change:.2e})")
    return f"a skipped step left nothing behind: weights off by {difference:.1e} after a step of {change:.1e}"


def deepspeed_format(ctx: Context) -> str:
    if ctx.launch.distributed_type != DistributedType.DEEPSPEED:
        raise Skipped("the launch does not use DeepSpeed")
    newest = max((ctx.out / "run" / "checkpoints").glob("step_*"))
    if not (newest / "pytorch_model").is_dir():
        raise Failed(f"{newest} is not in DeepSpeed's format (no pytorch_model/)")
    return "train, resume and pre-emption ran under DeepSpeed; checkpoints in its format (pytorch_model/)"


def faiss_gpu(ctx: Context) -> str:
    device = ctx.launch.device
    if device.type != "cuda":
        raise Skipped("no CUDA device")
    if centroid_search.backend() != "faiss-gpu":
        raise Skipped(f"k-means search {centroid_search.describe()}; for faiss's GPU index: README, GPU install")
    generator = torch.Generator(device).manual_seed(ctx.launch.process_index)
    rows = torch.randn(4096, 128, device=device, generator=generator)
    result = kmeans.fit(F.normalize(rows, dim=1), 256, iters=5)
    if not torch.isfinite(result.centroids).all() or int(result.sizes.sum()) != 4096 * ctx.world:
        raise Failed(f"k-means on the GPU gave sizes summing to {int(result.sizes.sum())}")
    return f"k-means, search faiss-gpu: {ctx.world} x 4096 rows -> 256 centroids, {result.iterations} iterations"


def full_batch(ctx: Context) -> str:
    """4 steps at the recipe's own global batch (per device: global / (processes x accumulation))."""
    device = ctx.launch.device
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    ctx.train("full", "run.max_steps=4", "grouping.regroup_every=1000000",
              *ctx.epoch_of(ctx.cfg.optim.global_batch_size))
    if not ctx.main:
        return ""
    _trained(ctx, "full", 4)
    steps = [r for r in ctx.records("full") if "loss" in r]
    batch = ctx.cfg.optim.global_batch_size // (ctx.world * ctx.cfg.optim.grad_accum_steps)
    ctx.found["throughput"] = steps[1:]
    peak = max(r["peak_memory_gb"] for r in steps)
    if device.type != "cuda":
        return f"{batch} images per device x {ctx.world}: peak host memory (RSS) {peak:.2f} GiB"
    estimate = memory_estimate.estimate(ctx.cfg, ctx.world, ctx.precision)
    allocated, total = (size / memory_estimate.GIB for size in (estimate.allocated, estimate.total))
    free, capacity = torch.cuda.mem_get_info(device)
    in_use = (capacity - free) / memory_estimate.GIB  # the context, NCCL, faiss and the allocator's cache too
    if peak > allocated:
        raise Failed(f"peak {peak:.2f} GiB allocated on {device} exceeds tools/memory.py's estimate of "
                     f"{allocated:.1f} GiB: the estimate misses a part (docs: README, Memory per device)")
    return (f"{batch} images per device x {ctx.world}: peak {peak:.2f} GiB allocated on {device} (estimated at "
            f"most {allocated:.1f} GiB); {in_use:.1f} GiB of the device's {capacity / memory_estimate.GIB:.0f} GiB "
            f"in use (estimated {total:.1f} GiB with the CUDA context, NCCL and faiss)")


def throughput(ctx: Context) -> str:
    steps = ctx.found["throughput"]
    per_device = sum(r["images_per_s"] for r in steps) / len(steps) / ctx.world
    wait = sum(r["data_wait_share"] for r in steps) / len(steps)
    return (f"{per_device:.1f} images/s per device over steps 2-{len(steps) + 1} of the full batch "
            f"(data wait {wait:.0%}: demo shards on this machine's loader)")


CHECKS = (
    Check("environment", environment),
    Check("demo shards", demo_shards),
    Check("train + re-grouping", train_steps, ("demo shards",)),
    Check("checkpoint", checkpoint_written, ("train + re-grouping",), main_only=True),
    Check("resume", resume, ("checkpoint",)),
    Check("pre-emption signal", preemption, ("resume",)),
    Check("export to timm", export, ("checkpoint",), main_only=True),
    Check("kNN monitor", knn_monitor, ("demo shards",)),
    Check("skipped step", skipped_step, ("demo shards",)),
    Check("DeepSpeed", deepspeed_format, ("train + re-grouping",), main_only=True),
    Check("faiss on the GPU", faiss_gpu),
    Check("full per-device batch", full_batch, ("demo shards",)),
    Check("images/s per device", throughput, ("full per-device batch",), main_only=True),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfcheck.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipes/<name>.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, applied to every run")
    parser.add_argument("--out", type=Path, default=Path("selfcheck"),
                        help="folder for the checks (default: selfcheck)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        ctx = Context(args.recipe, list(args.overrides), args.out, cfg)
        cpu_bf16.refuse_padding_taps(cfg, ctx.launch.device, ctx.precision)
    except ConfigError as err:
        print(f"selfcheck: error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    ctx.launch.wait_for_everyone()  # the process group starts here, outside the timed checks
    rows = run_checks(ctx, CHECKS)
    ctx.launch.destroy_process_group()
    if ctx.main:
        print(table(rows))
        (args.out / "selfcheck.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any(row["ok"] is False for row in rows) else 0
