"""Health signals of the grouping (docs/method.md "Grouping health") and the run log that reports them."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix

from smog_scale import dist
from smog_scale.config.schema import flatten
from smog_scale.config.schema import to_dict as config_dict

if TYPE_CHECKING:
    from smog_scale.training.step import TrainState


def assignment_health(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """From global per-group member counts [K]: groups used, assignment entropy (nats), largest share."""
    total = counts.sum().clamp(min=1).to(torch.float32)
    probs = counts.to(torch.float32) / total
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum()
    return {
        "groups_used": (counts > 0).sum(),
        "assignment_entropy": entropy,
        "largest_group_share": probs.max(),
    }


def cluster_size_health(sizes: torch.Tensor) -> dict[str, torch.Tensor]:
    """From a re-grouping's cluster sizes [K]: largest and smallest (0-dim) and the 0, 10, 50, 90 and 100%
    quantiles [5], all on the sizes' device."""
    sizes = sizes.float()
    levels = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], device=sizes.device)
    return {"largest": sizes.max(), "smallest": sizes.min(), "quantiles": torch.quantile(sizes, levels)}


def label_churn(old: torch.Tensor, new: torch.Tensor, num_groups: int) -> float:
    """The share of cached rows whose group changed at a re-grouping (docs/method.md "Grouping health").

    ``old`` and ``new`` [N] (long) are this rank's cached rows' groups under the old G and under the new one.
    k-means numbers its centroids arbitrarily, so the old groups are first matched one-to-one to the new ones so
    that as many rows as possible keep their (matched) group: the Hungarian algorithm (scipy's
    ``linear_sum_assignment``) on the [K, K] contingency of the union over all ranks, on rank 0's host. Churn is
    1 - kept / rows. A collective: every rank calls it and gets the same value (one gather, one broadcast).
    """
    pairs = dist.gather_cat(torch.stack([old, new], dim=1))  # [N_union, 2] on rank 0 only
    churn = torch.zeros(1, dtype=torch.float64, device=old.device)
    if pairs is not None and pairs.shape[0]:
        rows = pairs.cpu().numpy()
        counts = coo_matrix((np.ones(len(rows), np.float32), (rows[:, 0], rows[:, 1])), shape=(num_groups, num_groups))
        contingency = counts.toarray()  # duplicates summed; K = 3000: 36 MB, 0.6 s to match on one CPU core
        matched_old, matched_new = linear_sum_assignment(contingency, maximize=True)
        churn.fill_(1.0 - float(contingency[matched_old, matched_new].sum()) / len(rows))
    return float(dist.broadcast(churn).item())


def group_entropy(groups: torch.Tensor, classes: torch.Tensor, num_groups: int, num_classes: int) -> torch.Tensor:
    """Per-group class entropy of the paper's Fig. 5: for each group, sum_c -p_c log p_c over the class
    ratios of its members. Returns [num_groups] (nats; 0 for empty groups)."""
    joint = torch.zeros(num_groups, num_classes, dtype=torch.float64, device=groups.device)
    joint.index_put_((groups, classes), torch.ones_like(groups, dtype=torch.float64), accumulate=True)
    ratios = joint / joint.sum(dim=1, keepdim=True).clamp(min=1)
    return -(ratios * ratios.clamp(min=1e-300).log()).sum(dim=1)


# Step metrics that are each rank's share of its own batch: equal batches, so their mean over ranks is the
# global batch's (one all-reduce per log step).
RANK_MEANS = ("loss", "label_agreement", "prediction_hit_rate")


class RunLog:
    """Progress bar, ``metrics.jsonl`` and Accelerate trackers for one run; writes on the main process.

    ``step`` is a collective (it averages the loss over ranks), so every rank calls it on the same
    steps; between log steps nothing is synchronized.
    """

    def __init__(self, state: TrainState) -> None:
        from tqdm.auto import tqdm

        self.accelerator = state.accelerator
        self.main = state.accelerator.is_main_process
        run_dir = Path(state.cfg.run.output_dir)
        self.last_step = min(state.cfg.run.max_steps or state.derived.total_steps, state.derived.total_steps)
        self.bar = tqdm(total=self.last_step, initial=state.global_step, disable=not self.main,
                        desc="smog", dynamic_ncols=True, file=sys.stdout)
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if self.main else None
        self.window_start, self.window_step, self.waited = time.perf_counter(), state.global_step, 0.0
        if state.cfg.run.trackers:
            flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                    for k, v in flatten(config_dict(state.cfg)).items()}
            self.accelerator.init_trackers("tensorboard", config=flat)  # logs in RUN/tensorboard

    def data_wait(self, seconds: float) -> None:
        self.waited += seconds

    def _write(self, record: dict[str, Any], step: int) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def step(self, state: TrainState, metrics: dict[str, torch.Tensor | float]) -> None:
        step = state.global_step
        means = [key for key in RANK_MEANS if key in metrics]  # one all-reduce for them all
        reduced = dist.all_reduce_sum(torch.stack([torch.as_tensor(metrics[key]).float() for key in means]))
        averaged = dict(zip(means, (reduced / dist.world_size()).tolist()))
        now = time.perf_counter()
        elapsed, steps = now - self.window_start, max(step - self.window_step, 1)
        record = {"step": step, **averaged, **{k: float(v) for k, v in metrics.items() if k not in averaged},
                  "images_per_s": steps * state.cfg.optim.global_batch_size / elapsed,
                  "data_wait_share": min(self.waited / elapsed, 1.0), "samples_seen": state.samples_seen,
                  "skipped_samples": state.skipped_samples, "nonfinite_steps": state.nonfinite_steps,
                  "overflow_steps": state.overflow_steps,
                  "peak_memory_gb": _peak_memory_gb(state.accelerator.device), "time": time.time()}
        self._write(record, step)
        self.bar.update(step - self.bar.n)
        grouping = {} if "groups_used" not in record else {  # none under BYOL
            "groups": int(record["groups_used"]), "agree": f"{record['label_agreement']:.0%}",
            "hit": f"{record['prediction_hit_rate']:.0%}"}
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.3g}",
                             img_s=f"{record['images_per_s']:.0f}", wait=f"{record['data_wait_share']:.0%}", **grouping)
        self.window_start, self.window_step, self.waited = now, step, 0.0

    def event(self, step: int, name: str, values: dict[str, float]) -> None:
        """A record of named scalars at ``step`` (e.g. the kNN monitor), also shown on the bar."""
        self._write({"step": step, "event": name, **values}, step)
        self.message(f"step {step} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))

    def regroup(self, state: TrainState, result: Any, churn: float) -> None:
        """A re-grouping's record: k-means' cluster sizes and distance, and the label churn (:func:`label_churn`)."""
        stats = cluster_size_health(result.sizes)  # device math; the host reads follow
        record = {"step": state.global_step, "event": "regroup", "regroup/empty_reseeded": int(result.num_reseeded),
                  "regroup/largest_cluster": int(stats["largest"]), "regroup/smallest_cluster": int(stats["smallest"]),
                  "regroup/mean_cos_distance": float(result.mean_distance),
                  "regroup/size_quantiles": stats["quantiles"].tolist(), "regroup/label_churn": churn}
        self._write(record, state.global_step)
        self.message(f"step {state.global_step}: re-grouped, label churn {churn:.1%}")

    def message(self, text: str) -> None:
        if self.main:
            self.bar.write(f"smog_scale: {text}")
            if self.jsonl:
                self.jsonl.write(json.dumps({"message": text, "time": time.time()}) + "\n")
                self.jsonl.flush()

    def close(self) -> None:
        self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        self.accelerator.end_training()


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux: host peak RSS
