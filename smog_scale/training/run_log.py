"""The run log: progress bar, ``metrics.jsonl`` and Accelerate's trackers, with the grouping health it reports."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from smog_scale import dist
from smog_scale.config.schema import flatten
from smog_scale.config.schema import to_dict as config_dict
from smog_scale.method.health import cluster_size_health

if TYPE_CHECKING:
    from smog_scale.training.step import TrainState


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
