import json

import pytest
import torch
from accelerate import Accelerator

from smog_scale import checkpoint
from smog_scale.feature_cache import FeatureCache
from smog_scale.grouping import GroupBank


def make_parts(seed, dim_in=4, dim=3, cache_rows=8, pushed=6):
    """A stepped model + optimizer, groups and a partly filled cache: what a checkpoint holds."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(dim_in, dim)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, dim_in)).sum().backward()
    optimizer.step()
    bank, cache = GroupBank(5, dim), FeatureCache(cache_rows, dim)
    cache.push(torch.randn(pushed, dim), torch.arange(pushed))
    return model, optimizer, bank, cache


def test_save_keeps_last_and_load_restores_everything(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer, bank, cache = accelerator.prepare(*make_parts(0)[:2]) + make_parts(0)[2:]
    for step in (1, 2, 3):
        checkpoint.save(accelerator, tmp_path, step, bank, cache, {"global_step": step}, keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    (checkpoint.checkpoint_dir(tmp_path) / ".tmp-step_00000004").mkdir()  # a save that crashed midway
    newest = checkpoint.resolve("auto", tmp_path)
    assert newest.name == "step_00000003"
    assert json.loads((newest / "trainer_state.json").read_text()) == {"global_step": 3, "world_size": 1}

    model2, optimizer2, bank2, cache2 = make_parts(1)
    accelerator = Accelerator(cpu=True)  # a fresh process's accelerator
    model2, optimizer2 = accelerator.prepare(model2, optimizer2)
    state = checkpoint.load(accelerator, newest, bank2, cache2)
    assert state["global_step"] == 3
    assert torch.equal(bank2.groups, bank.groups)
    for a, b in zip(cache.state_dict().values(), cache2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(optimizer2.state_dict()["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["state"][0]["momentum_buffer"])


def test_resolve_errors_and_never(tmp_path):
    assert checkpoint.resolve("never", tmp_path) is None
    assert checkpoint.resolve("auto", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.resolve(str(tmp_path / "missing"), tmp_path)


def test_load_rejects_another_architecture(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer, bank, cache = make_parts(0)
    model, optimizer = accelerator.prepare(model, optimizer)
    path = checkpoint.save(accelerator, tmp_path, 1, bank, cache, {"global_step": 1}, keep_last=1)
    accelerator = Accelerator(cpu=True)
    other = torch.nn.Linear(4, 5)
    accelerator.prepare(other, torch.optim.SGD(other.parameters(), lr=1))
    with pytest.raises(RuntimeError, match="size mismatch"):
        checkpoint.load(accelerator, path, GroupBank(5, 3), FeatureCache(8, 3))
