"""PNG pictures of a run: training curves from ``metrics.jsonl`` and the group quality of the paper's Fig. 5.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global
backend switch), so the functions are safe in training jobs and tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# metrics.jsonl fields drawn by plot_training_curves, with their axis labels; missing ones are left out.
CURVES = {
    "loss": "loss",
    "lr": "learning rate",
    "groups_used": "groups used (global batch)",
    "assignment_entropy": "assignment entropy (nats)",
    "largest_group_share": "largest group's share",
    "label_agreement": "label agreement y_a = y_b",
    "prediction_hit_rate": "prediction hit rate",
    "images_per_s": "images / s",
    "knn_top1": "kNN top-1 (%)",
}
# Fields of the re-grouping events, drawn as points at their steps.
REGROUP_CURVES = {"regroup/label_churn": "label churn at re-grouping"}


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Records with a ``step`` (e.g. kNN monitor records too) and the ``regroup`` events' records.

    ``{"message": ...}`` lines have no step and are skipped; a truncated last line (a run still
    writing) is ignored, any other unreadable line fails naming its number.
    """
    lines = Path(path).read_text().splitlines()
    records, regroups = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not JSON: {err}") from err
        if record.get("event") == "regroup":
            regroups.append(record)
        elif "step" in record:
            records.append(record)
    return records, regroups


def plot_training_curves(metrics_path: str | Path, out_path: str | Path, title: str = "") -> list[str]:
    """One panel per field of :data:`CURVES` and :data:`REGROUP_CURVES` present in the run; re-groupings as
    dotted vertical lines.

    Returns the fields drawn. Raises ValueError when the file holds no step record.
    """
    records, events = read_metrics(metrics_path)
    fields = [f for f in CURVES if any(f in r for r in records)]
    if not fields:
        raise ValueError(f"{metrics_path}: no step records with any of {', '.join(CURVES)}")
    panels = [(f, CURVES[f], records) for f in fields]
    panels += [(f, label, events) for f, label in REGROUP_CURVES.items() if any(f in e for e in events)]
    regroups = [int(e["step"]) for e in events]
    columns = 2
    rows = (len(panels) + columns - 1) // columns
    fig = Figure(figsize=(6 * columns, 2.8 * rows), layout="constrained")
    for index, (field, label, source) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, index + 1)
        points = [(r["step"], r[field]) for r in source if r.get(field) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2, marker="." if len(points) < 50 else None)
        for step in regroups:
            ax.axvline(step, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"{metrics_path}" + (f" (dotted: {len(regroups)} re-groupings)" if regroups else ""))
    _save(fig, out_path)
    return [field for field, _, _ in panels]


def plot_group_quality(summary: dict[str, Any], out_path: str | Path, title: str = "") -> None:
    """Fig. 5 of the paper: histogram of the per-group entropy (non-empty groups), next to the same
    groups with shuffled labels (chance), and the distribution of group sizes."""
    entropy = [e for e in summary["group_entropy"] if e is not None]
    chance = [e for e in summary["chance_group_entropy"] if e is not None]
    sizes = [s for s in summary["group_sizes"] if s > 0]
    fig = Figure(figsize=(12, 4), layout="constrained")
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    top = max(summary["max_entropy"], max(entropy + chance, default=0.0))
    bins = [top * i / 30 for i in range(31)]
    left.hist(entropy, bins=bins, alpha=0.8, label=f"groups (mean {summary['mean_entropy']:.2f})")
    left.hist(chance, bins=bins, histtype="step", lw=1.5, color="black",
              label=f"shuffled labels (mean {summary['chance_mean_entropy']:.2f})")
    left.set_xlabel("entropy of the group's classes (nats)")
    left.set_ylabel("number of groups")
    left.legend()
    right.hist(sizes, bins=min(50, max(len(set(sizes)), 1)))
    right.set_xlabel("group size (samples)")
    right.set_ylabel("number of groups")
    right.set_title(f"{summary['non_empty_groups']} of {summary['num_groups']} groups non-empty, "
                    f"{summary['num_samples']} samples")
    fig.suptitle(title or "group entropy (Fig. 5 of SMoG); lower is better")
    _save(fig, out_path)


def _save(fig: Figure, out_path: str | Path) -> None:
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_path, dpi=110)
