"""Does a skipped step leave a trace in the next one? A probe of the launch, for the self-check and the tests.

Two short trainings from the same start (``loop.build`` seeds both alike) on synthetic batches: one takes a step
whose last micro-batch is not finite, which the trainer skips (docs/method.md "Gradient accumulation and skipped
steps"), then a clean step; the other takes the clean step alone. A skipped step changes nothing, so their
weights must be equal. Under DDP the skipped step's gradients are zeroed with it; under DeepSpeed they stay in
ZeRO's buffers unless the trainer drops them, and the first training's clean step then carries them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from smog_scale import dist
from smog_scale.config.derived import derive
from smog_scale.config.schema import Config
from smog_scale.launch.memory_estimate import crop_shapes
from smog_scale.training.loop import build
from smog_scale.training.step import TrainState, train_step


def synthetic_batch(cfg: Config, batch: int, seed: int, nonfinite: bool = False) -> dict:
    """A loader batch of random pixels: per crop size a uint8 [views, ``batch``, 3, S, S], and its keys.

    ``nonfinite``: float NaN images instead, which make the micro-batch's features and loss NaN."""
    generator = torch.Generator().manual_seed(seed)
    crops = [torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8) for shape in crop_shapes(cfg, batch)]
    if nonfinite:
        crops = [torch.full(c.shape, float("nan")) for c in crops]
    return {"crops": crops, "key": [f"probe-{seed}-{i}" for i in range(batch)]}


def _online_weights(state: TrainState) -> list[torch.Tensor]:
    """Float32 copies of the trained weights (online encoder and predictor), in the engine's working dtype."""
    return [p.detach().float().clone() for p in state.accelerator.unwrap_model(state.model).parameters()
            if p.requires_grad]


def _train(cfg: Config, new_accelerator: Callable[[Config], Accelerator],
           skipped_first: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A fresh build of ``cfg`` that takes (a skipped step, then) the clean step: the weights before and after
    the clean step. Accelerate's shared state is reset after it, so that the next build starts as this one did."""
    accelerator = new_accelerator(cfg)
    try:
        state = build(cfg, accelerator, derive(cfg, accelerator.num_processes, num_samples=10**6))
        micro, batch, rank = cfg.optim.grad_accum_steps, state.derived.batch_size_per_device, dist.rank()
        if skipped_first:
            for j in range(micro):
                train_step(state, synthetic_batch(cfg, batch, 1000 * rank + j, nonfinite=j == micro - 1))
            if state.nonfinite_steps != 1 or state.global_step != 0:
                raise RuntimeError(f"the non-finite micro-batch did not skip its step: {state.counters()}")
        before = _online_weights(state)
        for j in range(micro):
            train_step(state, synthetic_batch(cfg, batch, 1000 * rank + 100 + j))
        return before, _online_weights(state)
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()


def skipped_step_difference(cfg: Config, new_accelerator: Callable[[Config], Accelerator]) -> tuple[float, float]:
    """(largest |difference| of a trained weight between a skipped step + a clean step and the clean step alone,
    largest change of a trained weight that the clean step made), both over every rank. The first is 0 when the
    skipped step left nothing behind (exactly, where the kernels are deterministic, as on the CPU).

    ``cfg`` needs ``optim.grad_accum_steps`` >= 2 (a skipped step's finite micro-batches are what could leak);
    ``new_accelerator`` makes the launch's Accelerator (``loop.make_accelerator``), once per training."""
    if cfg.optim.grad_accum_steps < 2:
        raise ValueError("the probe needs optim.grad_accum_steps >= 2")
    start, clean = _train(cfg, new_accelerator, skipped_first=False)
    _, after_skip = _train(cfg, new_accelerator, skipped_first=True)
    difference = max(float((a - b).abs().max()) for a, b in zip(after_skip, clean))
    change = max(float((a - b).abs().max()) for a, b in zip(clean, start))
    both = dist.all_reduce_max(torch.tensor([difference, change], device=clean[0].device))
    return float(both[0]), float(both[1])
