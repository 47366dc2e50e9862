import json
import os
import tempfile

import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import save_file

from smog_scale.method.feature_cache import FeatureCache
from smog_scale.method.grouping import GroupBank
from smog_scale.training import checkpoint
from tests.helpers import make_parts, run_on_ranks


def test_save_keeps_last_and_load_restores_everything(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer, bank, cache = accelerator.prepare(*make_parts(0)[:2]) + make_parts(0)[2:]
    for step in (1, 2, 3):
        checkpoint.save(accelerator, tmp_path, step, bank, cache, {"global_step": step}, keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    (checkpoint.checkpoint_dir(tmp_path) / ".tmp-step_00000004").mkdir()  # a save that crashed midway
    newest = checkpoint.complete_checkpoints(tmp_path)[-1]
    assert newest.name == "step_00000003"
    assert json.loads((newest / "trainer_state.json").read_text()) == {"global_step": 3, "world_size": 1}

    model2, optimizer2, bank2, cache2 = make_parts(1)
    accelerator = Accelerator(cpu=True)  # a fresh process's accelerator
    model2, optimizer2 = accelerator.prepare(model2, optimizer2)
    state = checkpoint.load(accelerator, newest, bank2, cache2)
    assert state["global_step"] == 3
    assert torch.equal(bank2.groups, bank.groups) and torch.equal(bank2.updates, bank.updates)
    for a, b in zip(cache.state_dict().values(), cache2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(optimizer2.state_dict()["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["state"][0]["momentum_buffer"])


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


def _save(tmp_path, step, keep_last=5, recipe=None):
    accelerator = Accelerator(cpu=True)
    model, optimizer, bank, cache = make_parts(0)
    model, optimizer = accelerator.prepare(model, optimizer)
    return checkpoint.save(accelerator, tmp_path, step, bank, cache, {"global_step": step}, keep_last, recipe=recipe)


def test_recipe_is_saved_in_every_checkpoint_and_stale_temp_folders_go(tmp_path):
    root = checkpoint.checkpoint_dir(tmp_path)
    root.mkdir()
    crashed = [root / ".tmp-step_00000007", root / ".tmp-step_00000001"]  # saves that crashed midway
    for folder in crashed:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    path = _save(tmp_path, 2, recipe={"optim": {"epochs": 4}, "derived": {"total_steps": 20}})
    assert yaml.safe_load((path / "config.yaml").read_text()) == {"optim": {"epochs": 4}, "derived": {"total_steps": 20}}
    assert checkpoint.recipe_file(path) == path / "config.yaml"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]
    (path / "config.yaml").unlink()  # a checkpoint written before they held their recipe
    assert checkpoint.recipe_file(path) == tmp_path / "config.yaml"


def test_directories_are_fsynced_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.path.isdir(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = _save(tmp_path, 3)
    names = [name for name, _ in synced]
    last_temp = max(i for i, name in enumerate(names) if name.startswith(str(path.parent / ".tmp-")))
    assert (str(path.parent), True) in synced[last_temp + 1:]  # after the rename: the rename is durable
    assert (str(tmp_path), True) in synced  # and so is the checkpoints/ folder this save created
    assert (str(path.parent / ".tmp-step_00000003"), True) in synced  # the temp folder's entries
    files = {name for name, is_dir in synced if not is_dir}
    assert {str(path.parent / ".tmp-step_00000003" / name) for name in ("model.safetensors", "trainer_state.json")} <= files


def test_pruning_never_deletes_a_newer_checkpoint(tmp_path):
    for step in (1, 2, 6):
        _save(tmp_path, step)
    _save(tmp_path, 3, keep_last=1)  # a resume from step 2 that left step 6 in place
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_00000003", "step_00000006"]


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:100]),
     "model.safetensors: SafetensorError"),
    (lambda p: (p / "optimizer.bin").write_bytes((p / "optimizer.bin").read_bytes()[:-200]),
     "optimizer.bin: BadZipFile"),
    (lambda p: (p / "cache_rank0.safetensors").unlink(), "missing cache_rank0.safetensors"),
    (lambda p: (p / "trainer_state.json").write_text('{"global_step": 4'), "trainer_state.json: JSONDecodeError"),
])
def test_verify_names_the_file_that_does_not_load(tmp_path, damage, message):
    path = _save(tmp_path, 4)
    assert checkpoint.verify(path) == 4
    damage(path)
    with pytest.raises(checkpoint.UnreadableCheckpoint, match=message):
        checkpoint.verify(path)


def test_another_cache_size_at_the_same_world_size_loads(tmp_path):
    """grouping.cache_size may change on resume: the rows are dealt into the new cache, newest kept."""
    path = _save(tmp_path, 1)
    saved = make_parts(0)[3]  # 6 rows pushed into 8
    for capacity, kept in ((16, 6), (4, 4)):
        accelerator = Accelerator(cpu=True)
        model, optimizer, bank, _ = make_parts(1)
        accelerator.prepare(model, optimizer)
        cache = FeatureCache(capacity, 3)
        checkpoint.load(accelerator, path, bank, cache)
        feats, ids = cache.contents()
        assert torch.equal(feats, saved.contents()[0][-kept:]) and torch.equal(ids, saved.contents()[1][-kept:])


FAILURES = {  # phase -> (failing rank, what fails, the error it raises)
    "start": (0, "_start", OSError(13, "Permission denied")),  # the main process's mkdir
    "write": (1, "save_file", OSError(28, "No space left on device")),  # rank 1's cache file
    "publish": (0, "_publish", OSError(18, "Invalid cross-device link")),  # the main process's rename
}


def _save_failing(rank, world):
    """One rank of a 2-rank job that saves three times, each time with one phase failing on one rank;
    returns what each save raised on this rank."""
    import signal

    signal.alarm(120)  # a rank left waiting at a barrier would hang: the alarm kills it, failing the test
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    accelerator = Accelerator(cpu=True)
    model, optimizer, bank, cache = make_parts(0)
    model, optimizer = accelerator.prepare(model, optimizer)
    out = tempfile.gettempdir() + f"/failing-save-{os.getppid()}"
    errors = {}
    for phase, (culprit, name, error) in FAILURES.items():
        real = getattr(checkpoint, name)
        if rank == culprit:
            def fail(*args, error=error, **kwargs):
                raise error
            setattr(checkpoint, name, fail)
        try:
            checkpoint.save(accelerator, out, 1, bank, cache, {"global_step": 1}, keep_last=1)
            errors[phase] = ""
        except checkpoint.CheckpointSaveError as err:
            errors[phase] = str(err)
        setattr(checkpoint, name, real)
    return {"rank": accelerator.process_index, "errors": errors}


@pytest.mark.slow
def test_a_failed_save_on_one_rank_leaves_no_rank_waiting():
    """Every rank raises CheckpointSaveError (main() ends each with one line), none waits at a barrier."""
    results = run_on_ranks(_save_failing, 2)
    assert [r["rank"] for r in results] == [0, 1]
    for phase, (culprit, _, error) in FAILURES.items():
        for r in results:
            expected = error.strerror if r["rank"] == culprit else "failed on 1 other rank(s)"
            assert "writing checkpoint step_00000001 failed" in r["errors"][phase], (phase, r)
            assert expected in r["errors"][phase], (phase, r)


def test_checkpoint_without_update_counts_loads_them_as_zero(tmp_path):
    """Checkpoints written before the averaging rule hold G alone in smog.safetensors."""
    accelerator = Accelerator(cpu=True)
    model, optimizer, bank, cache = make_parts(0)
    model, optimizer = accelerator.prepare(model, optimizer)
    path = checkpoint.save(accelerator, tmp_path, 1, bank, cache, {"global_step": 1}, keep_last=1)
    save_file({"groups": bank.groups}, str(path / "smog.safetensors"))
    fresh = make_parts(1)[2]
    checkpoint.load(accelerator, path, fresh, FeatureCache(8, 3))
    assert torch.equal(fresh.groups, bank.groups) and not fresh.updates.any()
