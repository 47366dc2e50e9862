"""Health signals of the grouping (ALGORITHM.md "Health signals") and the run log that reports them."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from smog_scale.config import flatten
from smog_scale.config import to_dict as config_dict

if TYPE_CHECKING:
    from smog_scale.engine import TrainState


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


def group_entropy(groups: torch.Tensor, classes: torch.Tensor, num_groups: int, num_classes: int) -> torch.Tensor:
    """Per-group class entropy of the paper's Fig. 5: for each group, sum_c -p_c log p_c over the class
    ratios of its members. Returns [num_groups] (nats; 0 for empty groups)."""
    joint = torch.zeros(num_groups, num_classes, dtype=torch.float64, device=groups.device)
    joint.index_put_((groups, classes), torch.ones_like(groups, dtype=torch.float64), accumulate=True)
    ratios = joint / joint.sum(dim=1, keepdim=True).clamp(min=1)
    return -(ratios * ratios.clamp(min=1e-300).log()).sum(dim=1)


class RunLog:
    """Progress bar, ``metrics.jsonl`` and Accelerate trackers for one run; writes on the main process.

    ``step`` is a collective (it averages the loss over ranks), so every rank calls it on the same
    steps; between log steps nothing is synchronized.
    """

    def __init__(self, state: "TrainState") -> None:
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
        if self.main:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def step(self, state: "TrainState", metrics: dict[str, torch.Tensor | float]) -> None:
        from smog_scale import dist

        step = state.global_step
        loss = float(dist.all_reduce_sum(metrics["loss"].float()) / dist.world_size())
        now = time.perf_counter()
        elapsed, steps = now - self.window_start, max(step - self.window_step, 1)
        record = {"step": step, "loss": loss, **{k: float(v) for k, v in metrics.items() if k != "loss"},
                  "images_per_s": steps * state.cfg.optim.global_batch_size / elapsed,
                  "data_wait_share": min(self.waited / elapsed, 1.0), "samples_seen": state.samples_seen,
                  "skipped_samples": state.skipped_samples, "nonfinite_steps": state.nonfinite_steps,
                  "overflow_steps": state.overflow_steps,
                  "peak_memory_gb": _peak_memory_gb(state.accelerator.device), "time": time.time()}
        self._write(record, step)
        self.bar.update(step - self.bar.n)
        groups = {"groups": int(record["groups_used"])} if "groups_used" in record else {}  # none under BYOL
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.3g}", img_s=f"{record['images_per_s']:.0f}",
                             wait=f"{record['data_wait_share']:.0%}", **groups)
        self.window_start, self.window_step, self.waited = now, step, 0.0

    def event(self, step: int, name: str, values: dict[str, float]) -> None:
        """A record of named scalars at ``step`` (e.g. the kNN monitor), also shown on the bar."""
        self._write({"step": step, "event": name, **values}, step)
        self.message(f"step {step} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))

    def regroup(self, state: "TrainState", result: Any) -> None:
        stats = cluster_size_health(result.sizes)  # device math; the host reads follow
        record = {"step": state.global_step, "event": "regroup", "regroup/empty_reseeded": int(result.num_reseeded),
                  "regroup/largest_cluster": int(stats["largest"]), "regroup/smallest_cluster": int(stats["smallest"]),
                  "regroup/mean_cos_distance": float(result.mean_distance),
                  "regroup/size_quantiles": stats["quantiles"].tolist()}
        self._write(record, state.global_step)

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
