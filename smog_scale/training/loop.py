"""The training loop: build a launch's state, resume, then optimizer steps with their periodic events until done.

One training loader per launch, each epoch's pass from the data position; per committed step, in order: the log
(every ``run.log_every`` steps), re-grouping and momentum resets (``training.regrouping``), the kNN monitor, a stop
that SIGTERM/SIGUSR1 requested (checkpoint, exit code 0), the stop after ``run.max_nonfinite_steps`` skipped
steps in a row (checkpoint, exit code 1), and the periodic checkpoint. ``smog_scale/train.py`` is its command
line.
"""

from __future__ import annotations

import gc
import itertools
import signal
import time
import traceback
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from smog_scale import dist
from smog_scale.config.derived import derive
from smog_scale.config.schema import Config, Derived, resolved
from smog_scale.config.validation import crop_specs
from smog_scale.data.shards import TrainLoader, build_train_loader, cpu_worker_note
from smog_scale.method.feature_cache import FeatureCache
from smog_scale.method.grouping import GroupBank
from smog_scale.method.regroup_schedule import schedule
from smog_scale.models.smog import SMoGModel
from smog_scale.training import checkpoint, cpu_bf16, deepspeed_launch, monitor, regrouping
from smog_scale.training.optim import build_optimizer
from smog_scale.training.run_dir import Run
from smog_scale.training.run_log import RunLog
from smog_scale.training.step import TrainState, train_step


def make_accelerator(cfg: Config) -> Accelerator:
    """Accelerator for this launch; precision from the launcher unless the recipe sets it."""
    precision = {} if cfg.run.mixed_precision == "launcher" else {"mixed_precision": cfg.run.mixed_precision}
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.run.collective_timeout_s))
    accelerator = Accelerator(gradient_accumulation_steps=cfg.optim.grad_accum_steps, kwargs_handlers=[timeout],
                              log_with=cfg.run.trackers or None, project_dir=cfg.run.output_dir, **precision)
    deepspeed_launch.refuse_unsupported(accelerator, cfg)
    cpu_bf16.refuse_padding_taps(cfg, accelerator.device, accelerator.mixed_precision)
    set_cuda_backends(cfg)
    return accelerator


def set_cuda_backends(cfg: Config) -> None:
    """The recipe's cuDNN autotuning and TF32 for float32 matmuls and convolutions (``run.cudnn_benchmark``,
    ``run.tf32``); they change nothing off CUDA. Torch's legacy flags, which every supported torch reads."""
    torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = cfg.run.tf32
    torch.backends.cudnn.allow_tf32 = cfg.run.tf32


def pins_memory(cfg: Config, device: torch.device) -> bool:
    """Whether the training loader pins its batches: ``data.pin_memory`` on a CUDA device (nothing to pin for
    elsewhere)."""
    return cfg.data.pin_memory and device.type == "cuda"


def build(cfg: Config, accelerator: Accelerator, derived: Derived | None = None) -> TrainState:
    """Model, optimizer, groups and cache for this launch, prepared by Accelerate.

    ``derived`` by default from :func:`derive`, which checks the training shards."""
    derived = derived or derive(cfg, accelerator.num_processes)
    deepspeed_launch.write_recipe_values(accelerator, cfg, derived)  # else the config file's values win
    set_seed(cfg.run.seed)
    mc = cfg.model
    model: torch.nn.Module = SMoGModel(mc.backbone, mc.proj_hidden_dim, mc.proj_dim, mc.pred_hidden_dim,
                                       mc.backbone_kwargs)
    if mc.sync_bn and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # torch's SyncBN is CUDA-only
    if mc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if mc.compile:  # in place and before prepare: DDP or DeepSpeed wraps it; its keys and methods stay the model's
        model.compile()
    optimizer = build_optimizer(model, cfg.optim, derived.scaled_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.unwrap_model(model).settle_dtypes()  # DeepSpeed cast all parameters to bf16/fp16
    bank = GroupBank(cfg.grouping.num_groups, mc.proj_dim).to(accelerator.device)
    dist.broadcast(bank.groups)
    cache = FeatureCache(derived.cache_size_per_device, mc.proj_dim).to(accelerator.device)
    # Every rank built the same networks and G from run.seed. The draws from here on must differ between ranks
    # (Swin's drop path, random_select's keys): each rank continues from run.seed + rank (rank 0: run.seed's own).
    set_seed(cfg.run.seed, device_specific=True)
    return TrainState(cfg, derived, accelerator, model, optimizer, bank, cache)


def reading_settings(cfg: Config) -> dict[str, Any]:
    """The recipe's ``data.*`` settings for reading shards, as loader keyword arguments."""
    keys = ("open_attempts", "retry_delay_s", "stall_timeout_s", "read_timeout_s", "max_consecutive_failures")
    return {key: getattr(cfg.data, key) for key in keys}


def knn_monitor(state: TrainState, log: RunLog) -> None:
    """The kNN monitor (:func:`monitor.knn`) reading its shards with the recipe's settings."""
    monitor.knn(state, log, reading_settings(state.cfg))


def agreed(batches: Iterable[dict]) -> Iterator[dict]:
    """``batches``, each one's arrival agreed by every rank first (:func:`dist.agree_on_failure`): a rank whose
    loader raises (an unreadable shard, a dead worker) stops every rank at the same batch, the others with
    ``dist.PeerFailed`` naming its error, instead of leaving them in the step's collectives until the
    process group's timeout (``run.collective_timeout_s``) ends them."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as err:
            dist.agree_on_failure(err)
            raise
        dist.agree_on_failure(None)
        yield batch


def save(state: TrainState) -> Path:
    """A checkpoint of ``state`` at its ``global_step`` (a collective); returns its folder."""
    return checkpoint.save(state.accelerator, state.cfg.run.output_dir, state.global_step, state.bank,
                           state.cache, state.counters(), state.cfg.run.keep_last,
                           recipe=resolved(state.cfg, state.derived))


def train(state: TrainState, log: RunLog) -> int:
    """Optimizer steps from ``state.global_step`` to the last step; returns the exit code.

    0 when done or stopped on request, 1 after ``run.max_nonfinite_steps`` skipped steps in a row (a
    checkpoint is written either way)."""
    cfg, derived = state.cfg, state.derived
    last_step = min(cfg.run.max_steps or derived.total_steps, derived.total_steps)
    # One loader per launch (persistent workers unless data.persistent_workers=false), each epoch's pass from the
    # data position (``_epochs``): skipped steps consumed batches too.
    epoch, done = divmod(state.data_steps, derived.steps_per_epoch)
    loader = build_train_loader(
        cfg.data.train_shards, crops=crop_specs(cfg), batch_size=derived.batch_size_per_device,
        num_workers=cfg.data.num_workers, seed=cfg.run.seed, epoch=epoch, rank=dist.rank(),
        world_size=dist.world_size(), num_samples=derived.num_samples, shuffle_buffer=cfg.data.shuffle_buffer,
        start_batch=done * cfg.optim.grad_accum_steps, pin_memory=pins_memory(cfg, state.accelerator.device),
        persistent_workers=cfg.data.persistent_workers, **reading_settings(cfg))
    try:
        return _epochs(state, log, loader, last_step)
    finally:
        loader.close()  # the workers ignore SIGTERM: at exit, multiprocessing would wait for them forever


def _epochs(state: TrainState, log: RunLog, loader: TrainLoader, last_step: int) -> int:
    """:func:`train`'s steps, one ``loader`` pass per epoch."""
    cfg, derived = state.cfg, state.derived
    knn_every = cfg.monitor.knn_every_epochs * derived.steps_per_epoch
    while state.global_step < last_step:
        epoch, done = divmod(state.data_steps, derived.steps_per_epoch)
        loader.set_epoch(epoch, start_batch=done * cfg.optim.grad_accum_steps)
        remaining = (derived.steps_per_epoch - done) * cfg.optim.grad_accum_steps
        waited = time.perf_counter()
        for batch in agreed(itertools.islice(loader, remaining)):
            log.data_wait(time.perf_counter() - waited)
            end = train_step(state, batch)  # None before the last micro-batch of an optimizer step
            if end is not None:
                # The step's events, in order: log, re-grouping and resets, kNN monitor.
                step = state.global_step
                if end.committed and (step % cfg.run.log_every == 0 or step == last_step):
                    log.step(state, end.metrics)
                if end.committed:
                    regrouping.after_step(state, log)
                if end.committed and knn_every and (step % knn_every == 0 or step == last_step):
                    knn_monitor(state, log)
                # Stops: requested by a signal, or too many skipped steps in a row; each saves first.
                if state.stop_requested:
                    log.message(f"stop requested (SIGTERM/SIGUSR1): saved {save(state)}, exiting")
                    return 0
                if state.nonfinite_streak >= cfg.run.max_nonfinite_steps:
                    log.message(f"{state.nonfinite_streak} skipped (non-finite) steps in a row at step {step}: "
                                f"saved {save(state)}; lower the learning rate or check the data, then resume")
                    return 1
                # The periodic checkpoint, and the last one.
                if end.committed and (step % cfg.run.save_every == 0 or step >= last_step):
                    save(state)
                if step >= last_step:
                    break
            waited = time.perf_counter()
    return 0


def run_training(state: TrainState, run: Run) -> int:
    """Resume if ``run`` decided so, then :func:`train` with SIGTERM/SIGUSR1 asking for a stop.

    Returns :func:`train`'s exit code. An error propagates once the loader's workers are shut down."""
    log = RunLog(state)
    workers = cpu_worker_note(state.cfg.data.num_workers, state.accelerator.device)
    for note in (*run.notes, schedule(state.cfg, state.derived), *([workers] if workers else [])):
        log.message(note)
    if run.resume_from is not None:
        for key, value in checkpoint.load(state.accelerator, run.resume_from, state.bank, state.cache).items():
            if hasattr(state, key):
                setattr(state, key, value)
        log.message(f"resumed from {run.resume_from} at step {state.global_step}")

    def request_stop(signum: int, _frame: object) -> None:
        state.stop_signal = True  # a separate flag: the step in flight overwrites stop_requested

    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return train(state, log)
    except BaseException as err:
        # Free the DataLoader iterator the traceback holds, so its workers shut down now: they ignore
        # SIGTERM (pre-emption), and at exit multiprocessing would SIGTERM them and wait forever.
        traceback.clear_frames(err.__traceback__)
        gc.collect()
        raise
    finally:
        log.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
