"""Estimate a recipe's peak device memory per step: ``python tools/memory.py RECIPE [dotted.key=value ...]
[--processes N ...] [--precision bf16]``.

Builds the recipe's networks on fake CUDA tensors (no GPU, no memory used), counts the activations
saved for backward at the per-device batch of each launch size, and adds weights, gradients, DDP
buckets and optimizer state (smog_scale/launch/memory_estimate.py says what is counted). Exit code 2 on a bad recipe
or a global batch that does not split over the processes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from smog_scale.config.recipe_file import ConfigError
from smog_scale.config.validation import load_config
from smog_scale.launch import memory_estimate


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memory.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipes/<name>.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. optim.grad_accum_steps=2")
    parser.add_argument("--processes", type=int, nargs="+", default=[8], help="launch sizes (default: 8)")
    parser.add_argument("--precision", choices=tuple(memory_estimate.AUTOCAST_DTYPES), default="bf16",
                        help="autocast precision of the launch (default: bf16, as accelerate_configs/8gpu_bf16.yaml)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        for processes in args.processes:
            print(memory_estimate.estimate(cfg, processes, args.precision).summary())
    except ConfigError as err:
        print(f"memory.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
