"""The faults of a shared cluster: bad shards, a shard server that fails or stalls, a rank killed
mid-step, one rank's loader failing, a disk that fills during a checkpoint save."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import accelerate.checkpointing
import psutil
import pytest
import torch
import webdataset as wds
from accelerate import Accelerator

from smog_scale import train
from smog_scale.config.recipe_file import ConfigError
from smog_scale.config.validation import load_config
from smog_scale.data.multicrop import CropSpec
from smog_scale.data.shards import ShardOpenError, build_train_loader
from smog_scale.training import checkpoint
from tests.helpers import ROOT, TINY, TRAIN, ShardServer, launch, make_parts, records

CROPS = (CropSpec(size=16, count=2),)


def bad_shards(good: Path, folder: Path) -> str:
    """``truncated.tar`` (the first half of a demo shard) and ``corrupt.tar`` (a demo shard whose
    middle image is junk); returns the pattern over both."""
    folder.mkdir()
    data = (good / "shard-000001.tar").read_bytes()
    (folder / "truncated.tar").write_bytes(data[: len(data) // 2])
    with tarfile.open(good / "shard-000002.tar") as source, tarfile.open(folder / "corrupt.tar", "w") as sink:
        members = source.getmembers()
        images = [m.name for m in members if m.name.endswith(".jpg")]
        for member in members:
            payload = source.extractfile(member).read()
            if member.name == images[len(images) // 2]:
                payload = b"not a jpeg " * 50
            info = tarfile.TarInfo(member.name)
            info.size, info.mtime = len(payload), member.mtime
            sink.addfile(info, io.BytesIO(payload))
    return f"{folder}/{{truncated,corrupt}}.tar"


@pytest.mark.slow
def test_truncated_and_corrupt_shards_are_skipped_counted_and_training_goes_on(tmp_path, shards):
    pattern = bad_shards(shards, tmp_path / "bad")
    run = tmp_path / "run"
    out = launch(run, shards, f"data.train_shards={pattern}", "data.num_samples=80", "run.max_steps=4")
    logged = records(run)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] for r in logged)
    assert logged[-1]["skipped_samples"] >= 2, logged[-1]
    assert "UnidentifiedImageError" in out.stderr  # the junk image
    assert "ReadError" in out.stderr or "unexpected end of data" in out.stderr  # the cut tar


def test_http_404_is_retried_with_a_bound_then_named(shards):
    with ShardServer(shards) as server:
        url = f"{server.url}/missing-000000.tar"
        loader = build_train_loader(url, crops=CROPS, batch_size=2, num_workers=0, seed=0, num_samples=10,
                                    open_attempts=3, retry_delay_s=0.05)
        with pytest.raises(ShardOpenError, match=f"cannot open shard '{url}' after 3 attempts"):
            next(iter(loader))
    assert server.requests == ["/missing-000000.tar"] * 3  # our bounded retries, none hidden in curl


def test_http_stall_times_out_with_a_bound_then_named(shards):
    with ShardServer(shards) as server:
        url = f"{server.url}/stall/shard-000000.tar"  # the server accepts and never answers
        loader = build_train_loader(url, crops=CROPS, batch_size=2, num_workers=0, seed=0, num_samples=10,
                                    open_attempts=2, retry_delay_s=0.0, stall_timeout_s=1)
        start = time.monotonic()
        with pytest.raises(ShardOpenError, match=f"cannot open shard '{url}' after 2 attempts"):
            next(iter(loader))
        elapsed = time.monotonic() - start
    assert server.requests == ["/stall/shard-000000.tar"] * 2
    assert elapsed < 20, elapsed


@pytest.mark.slow  # curl's low-speed check needs ~7 s to see a stall after a burst
def test_http_transfer_stalled_midway_skips_the_shard_and_goes_on(shards):
    with ShardServer(shards) as server:
        urls = f"{server.url}/trickle/shard-000000.tar::{server.url}/shard-000001.tar"
        loader = build_train_loader(urls, crops=CROPS, batch_size=2, num_workers=0, seed=0, num_samples=10,
                                    resampled=False, stall_timeout_s=1)
        start = time.monotonic()
        batches = list(loader)
        elapsed = time.monotonic() - start
    assert len(batches) == 5 and sum(b["skipped"] for b in batches) >= 1  # shard 1 fills the epoch
    assert elapsed < 30, elapsed


@pytest.mark.slow
def test_unreachable_shards_end_the_trainer_with_the_url_not_a_hang(tmp_path, shards):
    with ShardServer(shards) as server:
        pattern = f"{server.url}/missing-{{000000..000001}}.tar"
        reading = ("data.open_attempts=2", "data.retry_delay_s=0.2")  # the recipe's retry settings reach the loader
        proc = launch(tmp_path / "run", shards, f"data.train_shards={pattern}", "data.num_samples=80", *reading,
                      wait=False)
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    # One line from the trainer, not the loader worker's traceback (accelerate's launcher adds its own).
    assert proc.returncode == 1 and "Original Traceback" not in out, out[-3000:]
    assert f"smog_scale: error: cannot open shard '{server.url}/missing-00000" in out, out[-3000:]
    assert "after 2 attempts" in out and "attempt 2/2" in out, out[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def _train_in_process(run: Path, shards: str, *overrides: str) -> int:
    """``train.main`` in this process (its SIGTERM/SIGUSR1 handlers are put back afterwards)."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return train.main([str(ROOT / "recipes" / "demo_cpu.yaml"), f"run.output_dir={run}",
                           f"data.train_shards={shards}", *TINY, *overrides])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_shards_where_nothing_decodes_end_the_trainer_with_one_line(tmp_path, capsys):
    """Images under a key the pipeline does not read: every sample fails. Today's loader skips them
    forever; the trainer now stops after data.max_consecutive_failures, naming shard, sample and error."""
    folder = tmp_path / "png"
    folder.mkdir()
    for index in range(2):
        with wds.TarWriter(str(folder / f"png-{index:06d}.tar")) as sink:
            for key in range(20):
                sink.write({"__key__": f"k{index}_{key:02d}", "png": b"\x89PNG...", "cls": 0})
    code = _train_in_process(tmp_path / "run", f"{folder}/png-{{000000..000001}}.tar", "data.num_samples=40",
                             "data.max_consecutive_failures=10")
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("smog_scale: error:")]
    assert code == 1 and len(errors) == 1, errors
    assert errors[0].startswith("smog_scale: error: 10 samples or shards in a row failed (max_consecutive_failures=10)"
                                f"; the first: shard '{folder}/png-00000"), errors[0]
    assert ", sample 'k" in errors[0] and "KeyError('jpg')" in errors[0]


def test_stalled_pipe_ends_the_trainer_with_the_shard_named(tmp_path, capsys):
    """A pipe: command that never sends blocks the reader forever today; data.read_timeout_s ends the job."""
    start = time.monotonic()
    code = _train_in_process(tmp_path / "run", "pipe:exec sleep 20", "data.num_samples=40", "data.open_attempts=1",
                             "data.stall_timeout_s=1", "data.read_timeout_s=2")
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("smog_scale: error:")]
    assert code == 1 and errors == ["smog_scale: error: no batch for 2 s (read_timeout_s): loader worker 0 has been "
                                    f"reading shard 'pipe:exec sleep 20' for {errors[0].split(' for ')[-1]}"], errors
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("override, message", [
    ("data.max_consecutive_failures=0", "data.max_consecutive_failures must be at least 1"),
    ("data.read_timeout_s=60", "data.read_timeout_s=60 must be 0 (no timeout) or exceed a shard's longest open, "
                               "data.open_attempts x data.stall_timeout_s + the retry delays = 93 s"),
    ("data.read_timeout_s=-1", "data.read_timeout_s=-1 must be 0"),
])
def test_loader_limits_are_checked_before_any_work(tmp_path, override, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  train_shards: /x/s-{0..3}.tar\n")
    with pytest.raises(ConfigError) as info:
        load_config(recipe, [override])
    assert message in str(info.value)
    assert load_config(recipe, ["data.read_timeout_s=0"]).data.read_timeout_s == 0


def _ranks(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The trainer processes torchrun started (its direct children), by global rank."""
    return {int(p.environ()["RANK"]): p for p in launcher.children() if "RANK" in p.environ()}


@pytest.mark.slow
def test_rank_killed_mid_step_ends_the_job_then_resume_works(tmp_path, shards):
    run = tmp_path / "run"
    overrides = ("optim.epochs=100", "run.save_every=2")
    proc = launch(run, shards, *overrides, processes=2, wait=False)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(records(run)) >= 3):
            time.sleep(0.2)
        assert checkpoint.complete_checkpoints(run), "no checkpoint before the kill"
        ranks = _ranks(psutil.Process(proc.pid))
        assert sorted(ranks) == [0, 1]
        ranks[1].send_signal(signal.SIGKILL)  # a node lost mid-step: no handler, no save
        killed = time.monotonic()
        out, _ = proc.communicate(timeout=120)
        ended = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and ended < 60, (ended, out[-3000:])  # ~6 s: gloo sees the reset
    assert not ranks[0].is_running() or ranks[0].status() == psutil.STATUS_ZOMBIE

    last = checkpoint.complete_checkpoints(run)[-1]
    step = json.loads((last / "trainer_state.json").read_text())["global_step"]
    assert 2 <= step < 500
    out = launch(run, shards, *overrides, f"run.max_steps={step + 2}", processes=2)
    assert f"resumed from {last} at step {step}" in out.stdout
    newest = checkpoint.complete_checkpoints(run)[-1]
    assert json.loads((newest / "trainer_state.json").read_text())["global_step"] == step + 2


# The trainer with rank 1's training loader failing at its third batch; the other rank's loader is untouched.
FAILING_LOADER_ON_RANK_1 = '''
import runpy
from smog_scale import dist
from smog_scale.training import loop
real = loop.build_train_loader
class Failing:
    def __init__(self, loader):
        self.loader = loader
    def __getattr__(self, name):  # set_epoch, close
        return getattr(self.loader, name)
    def __iter__(self):
        for index, batch in enumerate(self.loader):
            if index == 2:
                raise RuntimeError("injected loader failure")
            yield batch
def build_train_loader(*args, **kwargs):
    loader = real(*args, **kwargs)
    return Failing(loader) if dist.rank() == 1 else loader
loop.build_train_loader = build_train_loader
runpy.run_path({train!r}, run_name="__main__")
'''


@pytest.mark.slow
def test_one_ranks_loader_error_ends_every_rank_naming_it(tmp_path, shards):
    """2 gloo ranks, rank 1's loader raises: every rank stops at that batch, rank 0 with one line naming rank
    1's error (not a collective's connection error, nor a wait for the process group's timeout)."""
    script = tmp_path / "failing_loader.py"
    script.write_text(FAILING_LOADER_ON_RANK_1.format(train=str(TRAIN)))
    proc = launch(tmp_path / "run", shards, "run.max_steps=8", processes=2, wait=False, script=script)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, out[-3000:]
    assert ("smog_scale: error: stopped because another rank failed (rank 1: RuntimeError: injected loader "
            "failure)") in out, out[-3000:]
    assert len(records(tmp_path / "run")) == 2  # a step per batch: batches 0 and 1; batch 2 stopped both ranks


def _parts(seed: int):
    return make_parts(seed, dim_in=8, dim=4, cache_rows=16, pushed=10)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _disk_full():
    """A writer that writes a few bytes of the file, then fails as a full disk does."""
    def write(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return write


def _assert_previous_checkpoint_survives(root: Path, error: str, digest: dict[str, str], model, bank) -> None:
    previous = checkpoint.checkpoint_dir(root) / "step_00000001"
    assert "writing checkpoint step_00000002 failed" in error and f"newest complete checkpoint: {previous}" in error
    assert sorted(p.name for p in checkpoint.checkpoint_dir(root).iterdir()) == ["step_00000001"]  # no temp left
    assert _digest(previous) == digest and checkpoint.complete_checkpoints(root)[-1] == previous
    model2, optimizer2, bank2, cache2 = _parts(1)
    accelerator = Accelerator(cpu=True)
    model2, optimizer2 = accelerator.prepare(model2, optimizer2)
    assert checkpoint.load(accelerator, previous, bank2, cache2)["global_step"] == 1  # still usable
    assert torch.equal(model2.weight, model.weight) and torch.equal(bank2.groups, bank.groups)


@pytest.mark.parametrize("writer", ["ours", "accelerate"])
def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, writer):
    accelerator = Accelerator(cpu=True)
    model, optimizer, bank, cache = _parts(0)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpoint.save(accelerator, tmp_path, 1, bank, cache, {"global_step": 1}, keep_last=1)
    digest = _digest(checkpoint.checkpoint_dir(tmp_path) / "step_00000001")
    if writer == "ours":  # the per-rank cache file
        monkeypatch.setattr(checkpoint, "save_file", _disk_full())
    else:  # Accelerate's model weights
        monkeypatch.setattr(accelerate.checkpointing, "save", _disk_full())
    with pytest.raises(checkpoint.CheckpointSaveError) as info:
        checkpoint.save(accelerator, tmp_path, 2, bank, cache, {"global_step": 2}, keep_last=1)
    assert "No space left on device" in str(info.value)
    monkeypatch.undo()
    _assert_previous_checkpoint_survives(tmp_path, str(info.value), digest, model, bank)


def test_disk_full_on_a_real_tmpfs(tmp_path):
    """The same on a real full filesystem (a tiny tmpfs), where torch reports ENOSPC only as
    "unexpected pos"; skipped where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        accelerator = Accelerator(cpu=True)
        model, optimizer, bank, cache = _parts(0)
        model, optimizer = accelerator.prepare(model, optimizer)
        root = mount / "run"
        checkpoint.save(accelerator, root, 1, bank, cache, {"global_step": 1}, keep_last=1)
        digest = _digest(checkpoint.checkpoint_dir(root) / "step_00000001")
        free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        (mount / "filler").write_bytes(b"x" * (free - 8192))  # leave less than one checkpoint
        with pytest.raises(checkpoint.CheckpointSaveError) as info:
            checkpoint.save(accelerator, root, 2, bank, cache, {"global_step": 2}, keep_last=1)
        _assert_previous_checkpoint_survives(root, str(info.value), digest, model, bank)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
