"""The trainer's loop module: building a launch's state (every rank starts from the same networks and G, then draws
its own random numbers), a compiled model, the CUDA backend flags, the training loader's settings and the process
group's timeout the recipe sets; the batches the loop feeds its steps, resumed or not, with persistent loader
workers or without."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState

from smog_scale.config.validation import load_config
from smog_scale.launch.skip_probe import synthetic_batch
from smog_scale.training import loop
from smog_scale.training.step import StepEnd, train_step
from tests.helpers import ROOT, run_on_ranks, tiny_state


def _built(run: Path, shards: Path) -> dict[str, torch.Tensor]:
    """The weights and G ``loop.build`` makes, and the first 16 numbers drawn after it."""
    state = tiny_state(run, shards)
    model = state.accelerator.unwrap_model(state.model)
    return {"groups": state.bank.groups.clone(), "draw": torch.rand(16),  # as drop path and random_select draw
            **{name: p.detach().clone() for name, p in model.named_parameters()}}


def _built_on_rank(rank: int, world: int, run: str, shards: str) -> dict[str, torch.Tensor]:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    return _built(Path(run) / f"rank{rank}", Path(shards))


@pytest.mark.slow
def test_ranks_build_the_same_networks_then_draw_their_own_numbers(tmp_path, shards):
    """2 gloo ranks: identical weights and G, different draws (Swin's drop path would otherwise drop the same
    sample positions on every rank); rank 0 draws what one process draws, so a single process is unchanged."""
    ranks = run_on_ranks(_built_on_rank, 2, str(tmp_path), str(shards))
    single = _built(tmp_path / "single", shards)
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    for key in single:
        if key != "draw":
            assert torch.equal(ranks[0][key], ranks[1][key]) and torch.equal(ranks[0][key], single[key]), key
    assert not torch.equal(ranks[0]["draw"], ranks[1]["draw"])
    assert torch.equal(ranks[0]["draw"], single["draw"])


@pytest.mark.parametrize("on", [True, False])
def test_recipe_sets_cudnn_autotuning_and_tf32(on):
    cfg = load_config(ROOT / "recipes" / "demo_cpu.yaml", [f"run.cudnn_benchmark={str(on).lower()}",
                                                           f"run.tf32={str(on).lower()}"])
    flags = [(torch.backends.cudnn, "benchmark"), (torch.backends.cuda.matmul, "allow_tf32"),
             (torch.backends.cudnn, "allow_tf32")]
    before = [getattr(owner, name) for owner, name in flags]
    try:
        loop.set_cuda_backends(cfg)
        assert [getattr(owner, name) for owner, name in flags] == [on, on, on]
    finally:
        for (owner, name), value in zip(flags, before):
            setattr(owner, name, value)


class _Built(Exception):
    """Raised by a stand-in for the loader factory once it has seen its arguments."""


def test_training_loader_pins_memory_on_cuda_unless_the_recipe_says_not(tmp_path, shards, monkeypatch):
    state = tiny_state(tmp_path / "run", shards)
    seen: dict = {}

    def build_train_loader(*_args, **kwargs):
        seen.update(kwargs)
        raise _Built

    monkeypatch.setattr(loop, "build_train_loader", build_train_loader)
    with pytest.raises(_Built):
        loop.train(state, log=None)  # type: ignore[arg-type]  (not reached)
    assert seen["pin_memory"] is False  # a CPU launch: nothing to pin for
    assert seen["persistent_workers"] is True  # data.persistent_workers, on by default
    cuda = torch.device("cuda", 0)
    assert loop.pins_memory(state.cfg, cuda)
    off = load_config(ROOT / "recipes" / "demo_cpu.yaml", ["data.pin_memory=false"])
    assert not loop.pins_memory(off, cuda)


def test_recipe_sets_the_process_groups_timeout(tmp_path):
    """``run.collective_timeout_s`` bounds how long a rank waits in a collective for one that failed outside the
    loader (which ``loop.agreed`` stops at once: tests/training/test_faults.py)."""
    cfg = load_config(ROOT / "recipes" / "demo_cpu.yaml", [f"run.output_dir={tmp_path}", "run.trackers=[]",
                                                           "run.collective_timeout_s=42"])
    try:
        accelerator = loop.make_accelerator(cfg)
        assert accelerator.init_handler.timeout == timedelta(seconds=42)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _losses(run: Path, shards: Path, *overrides: str) -> list[float]:
    """Three steps of the tiny recipe from run.seed on fixed synthetic batches: their losses."""
    state = tiny_state(run, shards, *overrides)
    batches = [synthetic_batch(state.cfg, state.derived.batch_size_per_device, seed) for seed in range(3)]
    return [float(train_step(state, batch).metrics["loss"]) for batch in batches]


def test_compiled_model_trains_as_the_uncompiled_one(tmp_path, shards, monkeypatch):
    """``model.compile: true`` compiles the model in place before ``prepare``: its keys stay the model's, and three
    steps give the uncompiled losses. Dynamo and AOT autograd trace it here; the backend is aot_eager instead
    of inductor, whose code generation (minutes on this CPU) is the GPU's concern."""
    eager = _losses(tmp_path / "eager", shards)
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: compile_module(self, backend="aot_eager"))
    state = tiny_state(tmp_path / "keys", shards, "model.compile=true")
    assert all(not key.startswith("_orig_mod") for key in state.accelerator.unwrap_model(state.model).state_dict())
    torch._dynamo.utils.counters.clear()
    compiled = _losses(tmp_path / "compiled", shards, "model.compile=true")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the steps ran compiled graphs
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def _trained_keys(state, monkeypatch) -> list[str]:
    """The keys of every batch ``loop.train`` feeds its steps (a stand-in step that only counts)."""
    keys: list[str] = []

    def step(state, batch) -> StepEnd:
        keys.extend(batch["key"])
        state.global_step += 1
        state.data_steps += 1
        return StepEnd(committed=False, metrics={})

    monkeypatch.setattr(loop, "train_step", step)
    log = SimpleNamespace(data_wait=lambda _seconds: None)  # no step commits: nothing else logs
    assert loop.train(state, log) == 0  # type: ignore[arg-type]
    return keys


def test_the_trainer_resumed_at_epoch_2_sees_the_uninterrupted_run_s_batches(tmp_path, shards, monkeypatch):
    """``loop.train`` with persistent workers (the default), from the start and from a data position in epoch 2,
    against new workers every epoch: the same samples in the same order."""
    overrides = ("data.num_workers=2", "data.num_samples=96", "optim.epochs=3")
    state = tiny_state(tmp_path / "run", shards, *overrides)
    assert state.cfg.data.persistent_workers
    straight = _trained_keys(state, monkeypatch)
    per_epoch = state.derived.steps_per_epoch
    assert len(straight) == 3 * per_epoch * 8
    rebuilt = tiny_state(tmp_path / "rebuilt", shards, *overrides, "data.persistent_workers=false")
    assert _trained_keys(rebuilt, monkeypatch) == straight
    for position in (2 * per_epoch, 2 * per_epoch + 3):
        state.global_step = state.data_steps = position
        assert _trained_keys(state, monkeypatch) == straight[position * 8:]
