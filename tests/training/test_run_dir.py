"""One job per run folder, and a resume that is the same run: the trainer's start, in process.

The run of ``trained`` (3 steps, a checkpoint after each) is copied by each test that resumes it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from accelerate import Accelerator

from smog_scale import train
from smog_scale.config.recipe_file import ConfigError
from smog_scale.config.validation import load_config
from smog_scale.export.loading import resolve_checkpoint
from smog_scale.training import checkpoint, loop, monitor, run_dir
from smog_scale.training.run_dir import RunLock
from smog_scale.training.run_log import RunLog
from tests.helpers import ROOT, TINY, run_on_ranks

RECIPE = ROOT / "recipes" / "demo_cpu.yaml"


def run_main(run: Path, shards: Path, *overrides: str) -> int:  # noqa: F811
    return train.main([str(RECIPE), f"run.output_dir={run}", f"data.train_shards={shards}", *TINY, *overrides])


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards) -> Path:  # noqa: F811
    run = tmp_path_factory.mktemp("trained") / "run"
    assert run_main(run, shards, "run.max_steps=3", "run.save_every=1", "run.keep_last=5") == 0
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def test_every_path_is_checked_before_any_work(tmp_path, shards, capsys, monkeypatch):  # noqa: F811
    """demo_cpu.yaml with the user's own shards: the monitor's demo shards do not exist -> exit 2 at
    once (it used to train, then die at the last step without its final checkpoint)."""
    monkeypatch.chdir(tmp_path)  # the recipe's relative demo_out/ paths resolve here: nothing there
    out = tmp_path / "run"
    assert train.main([str(RECIPE), f"data.train_shards={shards}", f"run.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smog_scale: error: monitor.knn_train_shards: ") and "demo_out/shards/train" in err
    assert err.count("\n") == 1 and not out.exists()
    gone = tmp_path / "nowhere" / "step_00000004"
    assert run_main(out, shards, f"run.resume={gone}") == 2
    assert f"run.resume: {gone} is not a checkpoint that loads" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert run_main(tmp_path / "file", shards) == 2
    assert f"run.output_dir: {tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err


def test_missing_recipe_lists_the_recipes(capsys):
    assert train.main([]) == 2
    err = capsys.readouterr().err
    shipped = "recipes: recipes/byol_r50_400ep.yaml, recipes/demo_cpu.yaml, "
    assert err.startswith(f"smog_scale: error: no recipe given; {shipped}") and err.count("\n") == 1
    assert train.main(["recipes/nope.yaml", "optim.epochs=1"]) == 2
    assert f"recipe 'recipes/nope.yaml' does not exist; {shipped}" in capsys.readouterr().err


def test_resume_from_an_older_checkpoint_moves_the_newer_ones_aside(run, shards, capsys):  # noqa: F811
    """keep_last=1 used to delete the newer step_2 and step_3 in name order, then the one just written."""
    older = run / "checkpoints" / "step_00000001"
    assert run_main(run, shards, f"run.resume={older}", "run.max_steps=2", "run.keep_last=1") == 0
    out = capsys.readouterr().out
    checkpoints = run / "checkpoints"
    aside = [p for p in checkpoints.iterdir() if p.name.startswith(run_dir.SUPERSEDED)]
    assert len(aside) == 1 and names(aside[0]) == ["step_00000002", "step_00000003"]
    assert f"moved 2 checkpoint(s) newer than step 1 (step_00000002, step_00000003) to {aside[0]}" in out
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == ["step_00000002"]  # the new branch's
    state = json.loads((checkpoints / "step_00000002" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and not (run / run_dir.LOCK_NAME).exists()


def test_corrupt_newest_checkpoint_falls_back_and_a_failing_monitor_costs_nothing(run, shards, capsys):  # noqa: F811
    """A truncated newest checkpoint is skipped (named, with the reason) and moved aside; the kNN
    monitor, whose shards vanish after the start, fails at the last step: logged, and the final
    checkpoint is still written."""
    newest = run / "checkpoints" / "step_00000003"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    knn_shards = run.parent / "knn_shards"
    shutil.copytree(shards, knn_shards)
    real = monitor.build_eval_loader

    def vanishing(urls, **kwargs):  # the shards disappear once the run has started (and was checked)
        for shard in knn_shards.glob("*.tar"):
            shard.unlink()
        return real(urls, **kwargs)

    monitor.build_eval_loader = vanishing
    try:
        code = run_main(run, shards, "run.max_steps=3", "monitor.knn_every_epochs=1", "monitor.image_size=32",
                        f"monitor.knn_train_shards={knn_shards}", f"monitor.knn_val_shards={knn_shards}",
                        "data.open_attempts=1")
    finally:
        monitor.build_eval_loader = real
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert f"checkpoint step_00000003 skipped, it does not load: {weights}: SafetensorError" in captured.out
    assert "resumed from" in captured.out and "step_00000002 at step 2" in captured.out
    assert "step 3: kNN monitor failed on 1 rank(s) (cannot open shard " \
        f"'{knn_shards}/shard-0000" in captured.out and "training goes on" in captured.out
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 3, "event": "knn_failed", "failed_ranks": 1.0} in events
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == ["step_00000002", "step_00000003"]  # keep_last 2
    assert checkpoint.verify(run / "checkpoints" / "step_00000003") == 3  # rewritten, complete
    aside = next(p for p in (run / "checkpoints").iterdir() if p.name.startswith(run_dir.SUPERSEDED))
    assert (aside / "step_00000003" / "model.safetensors").stat().st_size == 1000  # the corrupt one, kept aside


def test_incompatible_resume_is_refused_listing_the_keys(run, shards, capsys):  # noqa: F811
    before = (run / "config.yaml").read_text()
    code = run_main(run, shards, "run.max_steps=5", "grouping.cache_size=128", "optim.epochs=8", "grouping.num_groups=16",
                    "run.log_every=2", "monitor.image_size=64")  # only these two keys may not change
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "step_00000003 was trained with another recipe" in err
    listed = err.split("these keys differ: ")[1].split(". Resume")[0].split("; ")
    assert [item.split(" ")[0] for item in listed] == ["grouping.num_groups", "optim.epochs", "derived.total_steps"]
    assert "optim.epochs (checkpoint 4, now 8)" in listed
    assert (run / "config.yaml").read_text() == before  # the run keeps its recipe
    assert not (run / run_dir.LOCK_NAME).exists()


def test_resume_never_refuses_a_folder_with_checkpoints_unless_overwrite(run, shards):  # noqa: F811
    cfg = load_config(RECIPE, [f"run.output_dir={run}", f"data.train_shards={shards}", *TINY, "run.resume=never"])
    with pytest.raises(ConfigError, match="run.resume=never: .* holds 3 checkpoint.s., newest step_00000003; "
                                          "continue them with run.resume=auto, or start over with run.overwrite=true"):
        run_dir.open_run(cfg, Accelerator(cpu=True))
    assert not (run / run_dir.LOCK_NAME).exists()
    opened = run_dir.open_run(load_config(RECIPE, [f"run.output_dir={run}", f"data.train_shards={shards}", *TINY,
                                                   "run.resume=never", "run.overwrite=true"]), Accelerator(cpu=True))
    try:
        assert opened.resume_from is None and (run / run_dir.LOCK_NAME).exists()
        assert checkpoint.complete_checkpoints(run) == [] and "moved 3 checkpoint(s) newer than step 0" in opened.notes[0]
    finally:
        opened.close()
    assert not (run / run_dir.LOCK_NAME).exists()


def test_every_checkpoint_holds_its_recipe_and_exports_read_it(run):
    (run / "config.yaml").write_text("rewritten by another launch\n")
    ckpt = resolve_checkpoint(run / "checkpoints" / "step_00000002")
    assert ckpt.config_file == run / "checkpoints" / "step_00000002" / "config.yaml"
    assert ckpt.recipe["model"]["backbone"] == "test_resnet" and ckpt.recipe["derived"]["total_steps"] == 20
    assert resolve_checkpoint(run).path.name == "step_00000003"


def _hold(folder: Path) -> subprocess.Popen:
    """Another job's main process holding the run folder's lock."""
    code = ("import sys, time; from pathlib import Path; from smog_scale.training.run_dir import RunLock; "
            "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_job_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(run, shards, capsys):  # noqa: F811
    holder = _hold(run)
    try:
        assert run_main(run, shards, "run.max_steps=4") == 2
        err = capsys.readouterr().err
        assert f"run.output_dir: {run} is in use by another job (host {socket.gethostname()}, pid {holder.pid}, " \
               f"started 20" in err and "one job per run folder" in err and err.count("\n") == 1
    finally:
        holder.kill()  # a crash: the lock stays behind
        holder.wait()
    assert (run / run_dir.LOCK_NAME).exists()
    cfg = load_config(RECIPE, [f"run.output_dir={run}", f"data.train_shards={shards}", *TINY, "run.max_steps=4"])
    opened = run_dir.open_run(cfg, Accelerator(cpu=True))
    opened.close()
    assert f"took over the stale lock of a job that is gone (host {socket.gethostname()}, pid {holder.pid}" \
        in opened.notes[0] and "is not running on this host" in opened.notes[0]
    assert not (run / run_dir.LOCK_NAME).exists()


def test_the_lock_is_released_when_training_fails(run, shards, monkeypatch):  # noqa: F811
    def crash(state, log):
        assert (run / run_dir.LOCK_NAME).exists()
        raise RuntimeError("boom")

    monkeypatch.setattr(loop, "train", crash)
    with pytest.raises(RuntimeError, match="boom"):
        run_main(run, shards, "run.max_steps=4")
    assert not (run / run_dir.LOCK_NAME).exists()


def _other_host(folder: Path, age_s: float, host: str = "node-b") -> Path:
    """A lock of a job on another node (or in another container: another pid namespace) whose last
    heartbeat was ``age_s`` ago."""
    lock = folder / run_dir.LOCK_NAME
    lock.write_text(json.dumps({"host": host, "pid": 4_000_000, "started": "2026-01-01T00:00:00+00:00", "token": "b",
                                "pid_namespace": "pid:[1]"}))
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


@pytest.mark.parametrize("host", ["node-b", socket.gethostname()])
def test_a_lock_of_another_node_is_judged_by_its_heartbeat(tmp_path, host):
    # Its heartbeat moves: a live job, refused as soon as the move is seen (its pid means nothing here,
    # on another node or in another container's pid namespace).
    lock = _other_host(tmp_path, 0.5, host)
    stop = threading.Event()

    def beat():
        while not stop.wait(0.1):
            os.utime(lock)

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        with pytest.raises(ConfigError, match=f"in use by another job .host {host}, pid 4000000, started 2026-01-01"):
            RunLock(tmp_path, heartbeat_s=0.2, stale_after_s=30).acquire()
    finally:
        stop.set()
        beating.join()
    # Silent for longer than stale_after_s: a dead job, taken over at once.
    _other_host(tmp_path, 100)
    mine = RunLock(tmp_path, heartbeat_s=0.2, stale_after_s=30)
    assert "no heartbeat for 10" in mine.acquire()
    mine.release()
    # Silent, but not for long enough yet: watched until stale (never forever), then taken over.
    _other_host(tmp_path, 0.5)
    start = time.monotonic()
    mine = RunLock(tmp_path, heartbeat_s=0.2, stale_after_s=2)
    assert "no heartbeat for 2 s" in mine.acquire()
    assert 1.0 < time.monotonic() - start < 10
    # The holder's heartbeat moves its lock's mtime; release removes it.
    first = (tmp_path / run_dir.LOCK_NAME).stat().st_mtime
    time.sleep(0.5)
    assert (tmp_path / run_dir.LOCK_NAME).stat().st_mtime > first
    mine.release()
    assert names(tmp_path) == []


def _two_ranks_agree(rank, world, shards, out):  # noqa: F811  (shards: a path here)
    """One rank of a 2-rank job: (1) rank 1 refuses the start: both ranks stop, rank 0 quietly, and the lock
    is released; (2) both start and agree on the checkpoint; (3) rank 1's monitor shards fail: both ranks
    log the failure, neither waits for the other."""
    signal.alarm(150)  # a rank left waiting in a collective would hang: the alarm kills it, failing the test
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    accelerator = Accelerator(cpu=True)
    overrides = [f"run.output_dir={out}", f"data.train_shards={shards}", *TINY, "data.open_attempts=1",
                 "monitor.knn_every_epochs=1", f"monitor.knn_train_shards={shards}", f"monitor.knn_val_shards={shards}",
                 "monitor.image_size=32", "monitor.batch_size=16", "data.num_workers=0"]
    result = {}
    real_check = run_dir.check_paths
    if rank == 1:
        def refuse(cfg):
            raise ConfigError("data.train_shards: not on this node")
        run_dir.check_paths = refuse
    try:
        run_dir.open_run(load_config(RECIPE, overrides), accelerator)
    except ConfigError as err:
        result["refused"] = type(err).__name__, str(err)
        result["lock_after_refusal"] = (Path(out) / run_dir.LOCK_NAME).exists()
    run_dir.check_paths = real_check
    cfg = load_config(RECIPE, overrides)
    opened = run_dir.open_run(cfg, accelerator)
    result["resume_from"] = str(opened.resume_from)
    state = loop.build(cfg, accelerator, opened.derived)
    if rank == 1:  # this rank's copy of the monitor shards is gone
        real = monitor.build_eval_loader
        monitor.build_eval_loader = lambda urls, **kw: real(str(Path(out) / "gone-{0..1}.tar"), **kw)
    log, warnings = RunLog(state), io.StringIO()
    with contextlib.redirect_stderr(warnings):
        loop.knn_monitor(state, log)
    log.bar.close()  # not log.close(): Accelerate's end_training would end the process group run_on_ranks ends
    result["warning"] = warnings.getvalue()
    opened.close()
    lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []
    result["events"] = [r for r in lines if "event" in r]
    return result


@pytest.mark.slow
def test_ranks_agree_on_refusals_checkpoints_and_monitor_failures(tmp_path, shards):  # noqa: F811
    results = run_on_ranks(_two_ranks_agree, 2, str(shards), str(tmp_path / "run"))
    assert results[0]["refused"] == ("RefusedElsewhere", "refused on another rank")
    assert results[1]["refused"] == ("ConfigError", "data.train_shards: not on this node")
    assert results[0]["lock_after_refusal"] is False
    assert results[0]["resume_from"] == results[1]["resume_from"] == "None"
    assert results[0]["events"] == [{"step": 0, "event": "knn_failed", "failed_ranks": 1.0}]
    assert "cannot open shard" in results[1]["warning"]
