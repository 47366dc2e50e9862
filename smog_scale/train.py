"""SMoG pretraining: ``accelerate launch smog_scale/train.py recipes/<name>.yaml [dotted.key=value ...]``.

The same command runs on a laptop CPU, one GPU, 8 GPUs or several nodes; the launcher decides.
Exit codes: 0 done or pre-empted (checkpoint written), 1 stopped on non-finite steps or an error
(an unreadable shard, a failed save, CUDA out of memory: one line naming it), 2 bad recipe or launch
(before any work). This module is the command line only; the loop is :mod:`smog_scale.training.loop`.
"""

from __future__ import annotations

import argparse
import sys

import torch

from smog_scale.config.recipe_file import ConfigError, shipped_recipes
from smog_scale.config.schema import Config, Derived
from smog_scale.config.validation import load_config
from smog_scale.data.shard_list import ShardError
from smog_scale.training.checkpoint import CheckpointSaveError
from smog_scale.training.loop import build, make_accelerator, run_training
from smog_scale.training.run_dir import RefusedElsewhere, open_run
from smog_scale.training.step import TrainState


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, check the recipe and the launch (exit 2), then train (exit 0 or 1)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help="recipes/<name>.yaml")
    parser.add_argument("overrides", nargs="*", default=[], help="dotted.key=value, e.g. optim.epochs=100")
    args = parser.parse_args(argv)
    try:
        if args.recipe is None:
            raise ConfigError(f"no recipe given; recipes: {shipped_recipes()}")
        cfg = load_config(args.recipe, args.overrides)
        accelerator = make_accelerator(cfg)
        run = open_run(cfg, accelerator)  # the main process now holds the run folder's lock
    except ConfigError as err:
        if not isinstance(err, RefusedElsewhere):
            print(f"smog_scale: error: {err}", file=sys.stderr)
        return 2
    try:
        state = build(cfg, accelerator, run.derived)
        try:
            return run_training(state, run)
        except (ShardError, CheckpointSaveError, torch.cuda.OutOfMemoryError) as err:
            print(f"smog_scale: error: {failure_line(err, state)}", file=sys.stderr)
            return 1
    finally:
        run.close()


def failure_line(err: BaseException, state: TrainState) -> str:
    """The one line a training error that names its culprit ends with (exit code 1)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):  # the keys that lower the per-device batch
        return oom_advice(state.cfg, state.derived, state.global_step)
    # From a loader worker the message ends a copy of the worker's traceback, whose last line is the error.
    return str(err).strip().splitlines()[-1]


def oom_advice(cfg: Config, derived: Derived, step: int) -> str:
    """The one line a CUDA out-of-memory error ends with: the per-device batch and the keys that lower it."""
    accumulation = cfg.optim.grad_accum_steps
    return (f"CUDA out of memory at step {step + 1} with {derived.batch_size_per_device} images per device "
            f"(optim.global_batch_size={cfg.optim.global_batch_size} / ({derived.world_size} processes x "
            f"optim.grad_accum_steps={accumulation})): launch more processes or set "
            f"optim.grad_accum_steps={2 * accumulation} to halve the per-device batch; "
            f"`python tools/memory.py RECIPE --processes N` estimates the memory")


if __name__ == "__main__":
    sys.exit(main())
