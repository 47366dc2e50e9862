"""Re-grouping and momentum resets in the trainer's step loop, in process: the four rows of the paper's
Table 7b (docs/method.md "Ablations")."""

from __future__ import annotations

import json

import pytest
import torch

from smog_scale import train
from smog_scale.config.derived import derive
from smog_scale.eval.plots import plot_training_curves
from smog_scale.method import regroup_schedule
from smog_scale.training import regrouping
from smog_scale.training.step import TrainState, train_step
from tests.helpers import BATCH, EPS32, ROOT, TINY, events, launch, records, synthetic_batch, tiny_state


class Log:
    """What RunLog would report: messages and the steps of re-groupings."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.regroups: list[int] = []

    def message(self, text: str) -> None:
        self.messages.append(text)

    def regroup(self, state: TrainState, result: object, churn: float) -> None:
        assert 0 <= churn <= 1
        self.regroups.append(state.global_step)


def momentum_is_online(state: TrainState) -> bool:
    model = state.accelerator.unwrap_model(state.model)
    return all(torch.equal(a, b) for a, b in zip(model.online.state_dict().values(), model.momentum.state_dict().values()))


ROWS = {  # Table 7b row: (overrides, steps re-grouped, steps after which the momentum encoder is the online one)
    "none": (["grouping.regroup_every=0", "grouping.reset_momentum=false"], [], []),
    "clustering": (["grouping.reset_momentum=false"], [2, 4], []),
    "clustering_and_reset": ([], [2, 4], [2, 4]),
    "reset_alone": (["grouping.regroup_every=0", "grouping.reset_every=2"], [], [2, 4]),
}


@pytest.mark.parametrize("row", ROWS)
def test_table_7b_rows(tmp_path, shards, row):  # noqa: F811
    overrides, regrouped, reset = ROWS[row]
    # 2 views x 8 images a step: 4 rows per group (K = 8) are there after step 2, the first periodic re-grouping
    state = tiny_state(tmp_path, shards, "grouping.regroup_every=2", "grouping.min_rows_per_group=4", *overrides)
    log, was_reset = Log(), []
    for step in range(4):
        train_step(state, synthetic_batch(step, 0))
        before = state.bank.groups.clone()
        regrouping.after_step(state, log)
        if state.global_step in regrouped:  # G replaced by the centroids, no group updated since
            assert not torch.equal(state.bank.groups, before) and not state.bank.updates.any()
        else:
            assert torch.equal(state.bank.groups, before)
        if momentum_is_online(state):
            was_reset.append(state.global_step)
    assert log.regroups == regrouped and was_reset == reset
    assert sum("momentum encoder reset" in m for m in log.messages) == (len(reset) if row == "reset_alone" else 0)
    if not regrouped:
        assert state.bank.updates.max() == 4  # never re-grouped: counts since the start
    assert BATCH * 2 * 4 == int(state.cache.filled)


@pytest.mark.parametrize(("overrides", "world", "first"), [
    ([], 1, 5),  # 10 rows x K = 8 groups = 80 rows; 2 global views x 8 images = 16 rows a step
    (["grouping.min_rows_per_group=2"], 1, 1),
    (["grouping.cache_size=48"], 1, 3),  # the full caches, when they hold less than 10 rows per group
    (["grouping.cache_size=50"], 2, 4),  # 25 rows on each of 2 ranks: 50 in all; still 16 rows a step over both
    (["grouping.num_groups=4", "grouping.cache_size=40", "optim.global_batch_size=16"], 1, 2),
])
def test_first_regroup_step_is_when_the_caches_hold_enough_rows(tmp_path, shards, overrides, world, first):  # noqa: F811
    cfg = tiny_state(tmp_path, shards, *overrides).cfg
    assert regroup_schedule.first_regroup_step(cfg, derive(cfg, world, num_samples=640)) == first


def test_trainer_regroups_as_soon_as_the_caches_hold_enough_then_periodically(tmp_path, shards):  # noqa: F811
    state = tiny_state(tmp_path, shards, "grouping.regroup_every=3")
    log = Log()
    for step in range(7):
        train_step(state, synthetic_batch(step, 0))
        regrouping.after_step(state, log)
    assert log.regroups == [5, 6]  # step 3's periodic one finds 48 rows < 80: skipped, G kept
    assert log.messages == [("step 3: re-grouping skipped, 48 cached features < 80 (grouping.min_rows_per_group x K, "
                             "or the full caches)")]


def test_schedule_line(tmp_path, shards):  # noqa: F811
    state = tiny_state(tmp_path, shards, "grouping.regroup_every=3")
    assert regroup_schedule.schedule(state.cfg, state.derived) == (
        "re-grouping: first after step 5 (when the caches hold 80 rows), then every 3 steps")
    state = tiny_state(tmp_path, shards, "model.objective=byol")
    assert regroup_schedule.schedule(state.cfg, state.derived) == "re-grouping: never (model.objective=byol)"


def test_health_signals_in_the_run_log(tmp_path, shards):  # noqa: F811
    """Every log step records the label agreement and the prediction hit rate, every re-grouping the label churn
    (docs/method.md "Grouping health"); tools/plot_metrics.py draws them."""
    run = tmp_path / "run"
    assert train.main([str(ROOT / "recipes" / "demo_cpu.yaml"), f"run.output_dir={run}", f"data.train_shards={shards}",
                       *TINY, "run.max_steps=6"]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert len(steps) == 6 and all(0 <= r[k] <= 1 for r in steps for k in ("label_agreement", "prediction_hit_rate"))
    regroups = [r for r in lines if r.get("event") == "regroup"]
    assert [r["step"] for r in regroups] == [2, 3, 6] and all(0 <= r["regroup/label_churn"] <= 1 for r in regroups)
    regrouped = [r["message"] for r in lines if "re-grouped, label churn" in r.get("message", "")]
    assert len(regrouped) == 3 and "(k-means search: torch (faiss" in regrouped[0]  # the backend, once
    assert not any("k-means search" in m for m in regrouped[1:])
    drawn = plot_training_curves(run / "metrics.jsonl", tmp_path / "curves.png")
    assert {"label_agreement", "prediction_hit_rate", "regroup/label_churn"} <= set(drawn)


def test_instance_warmup_keeps_groups_fills_the_caches_then_regroups(tmp_path, shards):  # noqa: F811
    """docs/method.md "Instance warm-up": for the first N steps NT-Xent trains the networks, G stays as built
    and the caches fill; the first re-grouping (with its momentum reset) follows step N even though the
    caches held enough rows after step 1, then the period takes over."""
    state = tiny_state(tmp_path, shards, "grouping.regroup_every=3", "grouping.min_rows_per_group=2",
                       "grouping.instance_warmup_steps=4")
    assert regroup_schedule.schedule(state.cfg, state.derived) == (
        "re-grouping: first after step 4 (when the caches hold 16 rows and the 4-step instance warm-up is over), "
        "then every 3 steps")
    built, log = state.bank.groups.clone(), Log()
    model = state.accelerator.unwrap_model(state.model)
    for step in range(7):
        weights = model.online.projector[0].weight.detach().clone()
        end = train_step(state, synthetic_batch(step, 0))
        assert end is not None and end.committed and torch.isfinite(torch.as_tensor(end.metrics["loss"]))
        assert not torch.equal(weights, model.online.projector[0].weight)  # the networks train in both phases
        if step < 4:
            torch.testing.assert_close(state.bank.groups, built, rtol=0, atol=4 * EPS32)  # renormalized only
            assert int(state.cache.filled) == BATCH * 2 * (step + 1)
        regrouping.after_step(state, log)
    assert log.regroups == [4, 6]
    assert not torch.equal(state.bank.groups, built)


@pytest.mark.slow
def test_instance_warmup_on_two_ranks_under_ddp(tmp_path, shards):  # noqa: F811
    """The warm-up's loss leaves the predictor out; DDP must still see every parameter used (or its next step
    fails waiting for their gradients), so the step runs on 2 gloo ranks, past the warm-up into SMoG."""
    run = tmp_path / "run"
    launch(run, shards, "run.max_steps=6", "grouping.instance_warmup_steps=3", "grouping.regroup_every=3",
           "grouping.min_rows_per_group=2", processes=2)
    losses = [r["loss"] for r in records(run)]
    assert len(losses) == 6 and all(abs(x) < 1e3 for x in losses)
    assert [r["step"] for r in events(run, "regroup")] == [3, 6]
