"""Training curves of a run to PNG: ``python tools/plot_metrics.py RUN OUT.png``.

Reads RUN/metrics.jsonl (or a metrics.jsonl given directly) and draws loss, lr, groups used,
assignment entropy, largest group's share, label agreement, prediction hit rate, images/s (and kNN top-1
when the run logs it) against the step, one panel each, and the label churn of each re-grouping;
re-groupings are dotted vertical lines, messages are skipped (README "Logs": what healthy curves look like).
Exit code 2 when the file is missing or holds no step record.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from smog_scale.eval.plots import plot_training_curves


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plot_metrics.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, metavar="RUN", help="run folder (or its metrics.jsonl)")
    parser.add_argument("out", type=Path, metavar="OUT.png", help="the picture to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    metrics = args.run if args.run.is_file() else args.run / "metrics.jsonl"
    if not metrics.is_file():
        print(f"plot_metrics: error: {metrics}: no such file", file=sys.stderr)
        return 2
    try:
        fields = plot_training_curves(metrics, args.out)
    except ValueError as err:
        print(f"plot_metrics: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({', '.join(fields)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
