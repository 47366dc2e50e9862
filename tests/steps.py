"""A one-process trainer state on tiny settings and synthetic multi-crop batches, for in-process step tests."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from test_train import ROOT, TINY

from smog_scale.config.validation import load_config
from smog_scale.training import loop
from smog_scale.training.step import TrainState

BATCH = 8  # images per micro-batch (and per rank)


def tiny_state(run: Path, shards: Path, *overrides: str, accumulation: int = 1,
               scaler: torch.amp.GradScaler | None = None) -> TrainState:
    """``loop.build`` on test_train's tiny recipe, global batch BATCH x (accumulation x world size).

    ``scaler`` wires a CPU GradScaler into Accelerate (it makes one only for GPUs), so the fp16 loss-scaling
    path (scaled backward, unscale, skipped optimizer step) runs on the CPU.
    """
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    accelerator.scaler = scaler
    world = accelerator.num_processes
    cfg = load_config(ROOT / "recipes" / "demo_cpu.yaml", [
        f"run.output_dir={run}", f"data.train_shards={shards}", *TINY, "data.num_samples=640",
        f"optim.global_batch_size={BATCH * accumulation * world}", f"optim.grad_accum_steps={accumulation}",
        "grouping.cache_size=128", "optim.name=sgd", "optim.warmup_epochs=0", *overrides])
    return loop.build(cfg, accelerator)


def synthetic_batch(step: int, first: int, size: int = BATCH) -> dict:
    """Samples ``first .. first + size - 1`` of step ``step``'s global batch: 2 global views at 16 px and 2
    local views at 8 px (uint8, as the loader yields them), the same pixels whichever rank or micro-batch
    draws them."""
    gen = torch.Generator().manual_seed(step)
    total = first + size
    global_views = torch.randint(0, 256, (2, total, 3, 16, 16), generator=gen, dtype=torch.uint8)
    local_views = torch.randint(0, 256, (2, total, 3, 8, 8), generator=gen, dtype=torch.uint8)
    return {"crops": [global_views[:, first:], local_views[:, first:]],
            "key": [f"step{step}-{i}" for i in range(first, total)]}
