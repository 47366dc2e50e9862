"""What the trainer settles with DeepSpeed: the launches it refuses, the recipe values its config takes, and a
skipped step's gradients dropped from its engine.

DeepSpeed reads its own config file (``accelerate_configs/deepspeed_zero*.yaml``), but the recipe is the one
source of what training computes: the values it fixes (per-device batch, accumulation, gradient clipping) are
written into DeepSpeed's config before ``accelerator.prepare`` builds the engine, whatever the file says.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from smog_scale.config.recipe_file import ConfigError
from smog_scale.config.schema import Config, Derived

SUPPORTED_ZERO_STAGES = (1, 2)


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def refuse_unsupported(accelerator: Accelerator, cfg: Config) -> None:
    """ConfigError (exit 2, before any work) for a DeepSpeed launch whose training would be wrong.

    LARS: its per-parameter trust ratio cannot be computed on ZeRO's flattened partitions. ZeRO stage 3 (or 0):
    stage 3 partitions every parameter of the module DeepSpeed is given, the frozen momentum encoder too, so
    its float32 EMA and its reset (``SMoGModel.update_momentum`` / ``reset_momentum``) would act on empty
    placeholders; stage 0 is plain data parallelism, which DDP (no DeepSpeed) runs."""
    if not uses_deepspeed(accelerator):
        return
    if cfg.optim.name == "lars":
        raise ConfigError("optim.name=lars cannot run under DeepSpeed ZeRO: its flattened partitions break "
                          "LARS's per-parameter trust ratio; use DDP (no DeepSpeed) or optim.name=adamw")
    stage = accelerator.state.deepspeed_plugin.zero_stage
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(f"DeepSpeed ZeRO stage {stage} is not supported: stage 3 partitions the frozen momentum "
                          "encoder too, whose float32 EMA would act on empty placeholders; launch ZeRO stage 1 or 2 "
                          "(accelerate_configs/deepspeed_zero2.yaml), or DDP without DeepSpeed")


def write_recipe_values(accelerator: Accelerator, cfg: Config, derived: Derived) -> None:
    """The recipe's per-device batch, accumulation and gradient clipping (``optim.clip_grad_norm``; 0: none) into
    DeepSpeed's config, which ``accelerator.prepare`` hands to the engine. Without them the config file's values
    (or accelerate's default clipping at 1.0) would apply to every recipe."""
    if uses_deepspeed(accelerator):
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=derived.batch_size_per_device,
            gradient_accumulation_steps=cfg.optim.grad_accum_steps,
            gradient_clipping=cfg.optim.clip_grad_norm or 0.0)


def drop_gradients(engine: torch.nn.Module) -> None:
    """Forget the gradients a skipped step's micro-batches accumulated in a DeepSpeed ZeRO-1/2 engine.

    Accelerate steps the engine only inside ``backward`` at the step's last micro-batch, and its optimizer
    wrapper's ``zero_grad`` does nothing, so after a micro-batch that was not finite (the rest skip their
    backward) the finite micro-batches' gradients would stay in ZeRO's buffers and join the next step. This
    clears what ZeRO's own overflow path clears when it skips a step: the 16-bit gradients and their
    accumulators, the accumulated and averaged partitions, the micro-step count."""
    optimizer: Any = getattr(engine, "optimizer", None)
    if optimizer is None:
        return
    optimizer.zero_grad(set_to_none=True)
    release = getattr(optimizer, "_release_preflattened_grad_buffers", None)
    if release is not None:  # before the partitions go: it reads them
        release()
    for name in ("averaged_gradients", "all_grad_tensors"):
        buffers: dict[Any, Any] = getattr(optimizer, name, None) or {}
        for key in buffers:
            buffers[key] = None
    if hasattr(optimizer, "micro_step_id"):
        optimizer.micro_step_id = -1  # DeepSpeed's INITIAL_MICRO_STEP_ID: the next backward starts a step
