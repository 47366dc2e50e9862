"""The training step in-process: skipped steps (fp16 overflow, non-finite) change no SMoG state, and
gradient accumulation does not change the algorithm."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from smog_scale.training import loop
from smog_scale.training.step import TrainState, train_step
from tests.helpers import BATCH, EPS32, run_on_ranks, synthetic_batch, tiny_state


def snapshot(state: TrainState) -> dict[str, torch.Tensor]:
    """G, the cache, the momentum encoder's weights and the online weights, cloned."""
    model = state.accelerator.unwrap_model(state.model)
    return {"groups": state.bank.groups.clone(), **{f"cache.{k}": v.clone() for k, v in state.cache.state_dict().items()},
            **{f"momentum.{k}": v.clone() for k, v in model.momentum.state_dict().items()},
            **{f"online.{k}": p.detach().clone() for k, p in model.online.named_parameters()}}


def run_step(state: TrainState, step: int):
    """One optimizer step of synthetic batches (one micro-batch per accumulation step)."""
    micro = state.accelerator.gradient_accumulation_steps
    ends = [train_step(state, synthetic_batch(step, j * BATCH)) for j in range(micro)]
    assert ends[:-1] == [None] * (micro - 1) and ends[-1] is not None
    return ends[-1]


def test_overflow_step_leaves_smog_state_and_schedules_as_they_were(tmp_path, shards):
    """fp16 loss scaling on the CPU: an inf gradient on step 2 (what an fp16 overflow produces) makes
    the GradScaler skip the optimizer step; G, cache, momentum encoder, weights and global_step stay."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    state = tiny_state(tmp_path, shards, "optim.clip_grad_norm=5.0", scaler=scaler)
    overflow = {"now": False}
    weight = state.accelerator.unwrap_model(state.model).online.projector[0].weight
    weight.register_hook(lambda grad: grad * float("inf") if overflow["now"] else grad)
    first = run_step(state, 0)
    assert first.committed and state.global_step == 1
    before = snapshot(state)
    overflow["now"] = True
    end = run_step(state, 1)
    assert not end.committed and torch.isfinite(end.metrics["loss"])
    assert scaler.get_scale() == 2.0**9  # the scaler saw the overflow and backed off
    after = snapshot(state)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert (state.global_step, state.data_steps, state.overflow_steps, state.nonfinite_steps) == (1, 2, 1, 0)
    assert state.nonfinite_streak == 1 and state.samples_seen == 2 * BATCH
    overflow["now"] = False
    again = run_step(state, 2)  # the next step runs at the schedules' step 1, as the skipped one did
    assert again.committed and again.metrics["lr"] == end.metrics["lr"] != first.metrics["lr"]
    assert (state.global_step, state.data_steps, state.nonfinite_streak) == (2, 3, 0)
    assert not torch.equal(state.bank.groups, before["groups"])


def test_nonfinite_micro_batch_skips_the_whole_accumulated_step(tmp_path, shards):
    """NaN features in the second micro-batch of an accumulated step: the first micro-batch's gradients are
    dropped with it, nothing is committed, the step is counted as non-finite."""
    state = tiny_state(tmp_path, shards, "grouping.beta_start=0.9", accumulation=2)
    run_step(state, 0)
    before = snapshot(state)
    poison = False
    state.accelerator.unwrap_model(state.model).online.backbone.register_forward_hook(
        lambda module, args, out: out * float("nan") if poison else out)
    assert train_step(state, synthetic_batch(1, 0)) is None
    poison = True
    end = train_step(state, synthetic_batch(1, BATCH))
    assert end is not None and not end.committed
    after = snapshot(state)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert (state.global_step, state.data_steps, state.nonfinite_steps, state.overflow_steps) == (1, 2, 1, 0)
    assert state.accumulator.micro_batches == 0 and not state.accumulator.nonfinite
    assert all(p.grad is None for p in state.model.parameters())


CASES = {  # name: (optimizer steps, recipe overrides)
    "beta_1": (3, ["grouping.beta_start=1.0", "grouping.beta_end=1.0"]),  # g' = g: no gradient through it
    "lr_0": (3, ["grouping.beta_start=0.9", "grouping.beta_end=0.9", "optim.base_lr=0.0"]),  # weights stay
    "beta_0.9": (1, ["grouping.beta_start=0.9", "grouping.beta_end=0.9"]),
    "beta_0.99": (1, ["grouping.beta_start=0.99", "grouping.beta_end=0.99"]),
    "averaging_lr_0": (3, ["grouping.update=averaging", "optim.base_lr=0.0"]),  # update counts over 3 commits
    "random_select": (2, ["grouping.update=random_select", "grouping.cache_features=online"]),
}


def trajectory(state: TrainState, steps: int, first: int) -> dict[str, torch.Tensor]:
    """G, parameters and cache after ``steps`` optimizer steps, micro-batch j of step t drawing samples
    first + j * BATCH .. of step t's global batch."""
    for step in range(steps):
        for j in range(state.accelerator.gradient_accumulation_steps):
            train_step(state, synthetic_batch(step, first + j * BATCH))
    model = state.accelerator.unwrap_model(state.model)
    feats, ids = state.cache.contents()
    return {"groups": state.bank.groups.clone(), "cache": feats, "ids": ids,
            **{k: p.detach().clone() for k, p in model.named_parameters()}}


def in_float64(state: TrainState) -> TrainState:
    """``state`` computing in float64 from here on: networks, G and cache converted in place (the optimizer keeps
    its parameters; the uint8 crops are normalized in float32, then cast to the networks' dtype)."""
    for module in (state.accelerator.unwrap_model(state.model), state.bank, state.cache):
        module.double()
    return state


def rounding_atol(single: torch.Tensor, reference: torch.Tensor) -> float:
    """Tolerance between two float32 runs of one computation: 4 x how far this CPU's float32 run ``single`` lands
    from the float64 run ``reference`` (two runs differ by at most the sum of their errors; 4 leaves the other
    run's kernels twice as much), at least one float32 rounding of the largest value.

    Measured, not a constant: BatchNorm over 8 small crops is ill-conditioned, so kernels that add in another
    order (other CPUs, thread counts) move the first convolution's gradient by up to 1% here, and 3 steps carry
    that into the weights, G and the cache."""
    error = float((single.double() - reference).abs().max())
    return 4 * max(error, EPS32 * float(reference.abs().max()))


def _rank_trajectories(rank: int, world: int, run: str, shards: str) -> dict[str, dict[str, torch.Tensor]]:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    return {name: trajectory(tiny_state(Path(run) / name, Path(shards), *overrides), steps, rank * BATCH)
            for name, (steps, overrides) in CASES.items()}


@pytest.mark.slow
def test_accumulation_of_two_equals_two_ranks(tmp_path, shards):
    """1 process with 2 micro-batches per step == 2 gloo processes with one each, over the same samples.

    BatchNorm normalizes the same 8 images either way (no SyncBN on CPU ranks), so what is left to differ
    is only what the method allows (docs/method.md, gradient accumulation): each micro-batch's loss uses its
    own partial update g'_j = beta g + (1 - beta) mean_j where the two ranks share the global one. Hence:
    - G, labels, assignments and cache rows equal at any beta while the weights are equal: after the first
      step ("beta_0.9", "beta_0.99"), and over 3 steps with a zero learning rate ("lr_0"), where G moves by
      3 commits (a micro-batch taking labels from a G moved by the one before, or G committed per micro-batch,
      breaks this);
    - the weights equal over 3 steps at beta = 1 ("beta_1": g' = g, no gradient through the update);
    - elsewhere the weight update differs by O(1 - beta): after one step by less than 2 (1 - beta) of its
      norm, and 10x less at beta 0.99 than at 0.9;
    - the averaging rule's update counts follow the commits alike ("averaging_lr_0");
    - random_select draws with each rank's own generator: its G is identical on both ranks, and every group that
      moved took one member's online feature (cached here, ``cache_features=online``) from either rank.
    The two float32 computations add in other orders (DDP's all-reduce vs accumulated gradients, the group sums),
    so "equal" is up to float32 rounding, measured against the same single-process run in float64.
    """
    ranks = run_on_ranks(_rank_trajectories, 2, str(tmp_path / "ranks"), str(shards))
    initial = tiny_state(tmp_path / "initial", shards)
    initial_groups = initial.bank.groups.clone()  # every state starts from the same seed
    initial = {k: p.detach().clone() for k, p in initial.accelerator.unwrap_model(initial.model).named_parameters()}
    drift = {}
    for name, (steps, overrides) in CASES.items():
        if name == "random_select":
            assert torch.equal(ranks[0][name]["groups"], ranks[1][name]["groups"])
            cached = torch.cat([r[name]["cache"] for r in ranks])
            moved = ranks[0][name]["groups"][(ranks[0][name]["groups"] != initial_groups).any(dim=1)]
            # 1e-6: a moved group is its member's unit feature renormalized once more, a few float32 roundings
            assert len(moved) and (moved.unsqueeze(1) - cached.unsqueeze(0)).abs().amax(dim=2).amin(dim=1).max() < 1e-6
            continue
        single = trajectory(tiny_state(tmp_path / name, shards, *overrides, accumulation=2), steps, 0)
        reference = trajectory(in_float64(tiny_state(tmp_path / f"{name}-64", shards, *overrides, accumulation=2)),
                               steps, 0)
        atol = {k: rounding_atol(v, reference[k]) for k, v in single.items() if v.is_floating_point()}  # measured
        for rank, result in enumerate(ranks):
            got = result[name]
            torch.testing.assert_close(got["groups"], single["groups"], rtol=0, atol=atol["groups"], msg=name)
            # single cache: per step, micro-batch 0's rows then micro-batch 1's; rank r holds micro-batch r's
            rows = single["cache"].shape[0] // (2 * steps)
            for key in ("cache", "ids"):
                mine = single[key].unflatten(0, (steps, 2, rows))[:, rank].flatten(0, 1)
                torch.testing.assert_close(got[key], mine, rtol=0, atol=atol.get(key, 0), msg=f"{name} {key}")
        params = [k for k in initial if k.startswith(("online.", "predictor."))]
        update = torch.cat([(ranks[0][name][k] - initial[k]).flatten() for k in params])
        difference = torch.cat([(single[k] - ranks[0][name][k]).flatten() for k in params])
        drift[name] = float(difference.norm() / update.norm().clamp(min=1e-12))
        if name in ("beta_1", "lr_0", "averaging_lr_0"):
            for key in initial:
                torch.testing.assert_close(ranks[0][name][key], single[key], rtol=0, atol=atol[key],
                                           msg=f"{name} {key}")
    assert 0 < drift["beta_0.9"] < 2 * 0.1 and 0 < drift["beta_0.99"] < 2 * 0.01, drift
    assert drift["beta_0.99"] < 0.15 * drift["beta_0.9"], drift


def test_loader_resumes_at_the_data_position_not_the_step_count(tmp_path, shards, monkeypatch):
    """After skipped steps global_step < batches consumed; the loader restarts from ``data_steps``."""
    state = tiny_state(tmp_path, shards, accumulation=2)
    per_epoch = state.derived.steps_per_epoch
    state.global_step, state.data_steps = per_epoch - 1, per_epoch + 2  # 3 steps were skipped
    opened = {}

    class Opened(Exception):
        """Ends train() at the loader: only its position matters."""

    def loader(*args, **kwargs):
        opened.update(kwargs)
        raise Opened

    monkeypatch.setattr(loop, "build_train_loader", loader)
    with pytest.raises(Opened):
        loop.train(state, log=None)
    assert (opened["epoch"], opened["start_batch"]) == (1, 2 * 2)  # epoch 1, its 3rd step of 2 micro-batches
