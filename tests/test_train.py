"""The trainer end to end through ``accelerate launch`` on tiny demo shards (CPU)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from smog_scale.export.timm_export import export_timm
from tests.helpers import (
    ROOT,
    TINY,
    TRAIN,
    events,
    final_state,
    float_dtypes,
    launch,
    launch_deepspeed,
    monitor_on,
    records,
)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_training_runs_and_checkpoints(tmp_path, shards, processes):
    run = tmp_path / "run"
    monitor = monitor_on(shards, every_epochs=2) if processes == 1 else []
    launch(run, shards, "run.max_steps=12", *monitor, processes=processes)
    if monitor:  # 5 steps per epoch: kNN after step 10 and at the last step
        knn = events(run, "knn")
        assert [r["step"] for r in knn] == [10, 12] and all(0 <= r["knn_top1"] <= 100 for r in knn)
    losses = [r["loss"] for r in records(run)]
    assert len(losses) == 12 and all(map(lambda x: x == x and abs(x) < 1e3, losses))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    ckpt = run / "checkpoints" / "step_00000012"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["config.yaml", "model.safetensors", "optimizer.bin", "smog.safetensors", "trainer_state.json"]
        + [f"random_states_{r}.pkl" for r in range(processes)] + [f"cache_rank{r}.safetensors" for r in range(processes)])
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["global_step"], state["samples_seen"], state["world_size"]) == (12, 12 * 16, processes)
    groups = load_file(str(ckpt / "smog.safetensors"))["groups"]
    assert groups.shape == (8, 16) and torch.allclose(groups.norm(dim=1), torch.ones(8))
    for r in range(processes):
        rank = load_file(str(ckpt / f"cache_rank{r}.safetensors"))
        assert torch.equal(rank["groups"], groups), f"rank {r} holds different groups"
        assert int(rank["filled"]) == 64 // processes  # each rank keeps its share of the 64-row union: full
    assert (run / "config.yaml").is_file() and not list((run / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_resume_equals_straight_run(tmp_path, shards):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(straight, shards, "run.max_steps=8")
    launch(resumed, shards, "run.max_steps=5")  # stops mid-epoch (5 steps per epoch are 4.. see derive)
    out = launch(resumed, shards, "run.max_steps=8")
    assert "resumed from" in out.stdout
    a, b = final_state(straight), final_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["loss"] for r in records(straight)] == [r["loss"] for r in records(resumed)]


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues(tmp_path, shards):
    run = tmp_path / "run"
    proc = launch(run, shards, "optim.epochs=100", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(records(run)) >= 3):
        time.sleep(0.5)
    # The trainer and its loader workers get the signal, as from SLURM at pre-emption; accelerate's
    # launcher is spared so its exit code is the trainer's.
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    saved = sorted((run / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and "stop requested" in out
    step = json.loads((saved[0] / "trainer_state.json").read_text())["global_step"]
    assert 3 <= step < 500
    launch(run, shards, "optim.epochs=100", f"run.max_steps={step + 2}")  # the same run: same schedule
    assert json.loads((sorted((run / "checkpoints").glob("step_*"))[-1] / "trainer_state.json").read_text())[
        "global_step"] == step + 2


@pytest.mark.parametrize("override, message", [
    ("optim.lr=1", "unknown key 'optim.lr'; did you mean"),
    ("optim.epochs=many", "optim.epochs: expected int, got 'many'"),
    ("data.train_shards=/nowhere/x-{0..3}.tar", "4 of 4 shards of '/nowhere/x-{0..3}.tar' cannot be read: /nowhere/x-0.tar does not exist"),
    ("grouping.num_groups=100", "grouping.num_groups=100 exceeds the feature cache: grouping.cache_size=64 leaves"),
    ("run.mixed_precision=bf16", "bf16 on the CPU: torch's CPU convolution backward in bf16 returns garbage weight"),
])
def test_bad_recipe_exits_2_naming_the_key(tmp_path, shards, override, message):
    cmd = [sys.executable, str(TRAIN), str(ROOT / "recipes" / "demo_cpu.yaml"), f"run.output_dir={tmp_path}",
           f"data.train_shards={shards}", *TINY, override]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_deepspeed_zero2_bf16_trains_resumes_exports_and_refuses_lars(tmp_path, shards):
    """One CPU process under DeepSpeed ZeRO-2 in bf16, as the shipped DeepSpeed configs run, with the kNN monitor
    on (several ranks: test_deepspeed_resume_on_another_world_size_is_refused). DeepSpeed casts the online
    networks to bf16; the momentum encoder and G stay float32, in the checkpoint too. The recipe's clipping
    (none here) reaches DeepSpeed's config; LARS and ZeRO stage 3 are refused before any work."""
    run = tmp_path / "run"
    for steps in (4, 6):
        done = launch_deepspeed(run, shards, "bf16", f"run.max_steps={steps}", *monitor_on(shards))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "resumed from" in done.stdout
    knn = events(run, "knn")  # every epoch (5 steps) and at each launch's last step, on the bf16 backbone
    assert [r["step"] for r in knn] == [4, 5, 6] and all(0 <= r["knn_top1"] <= 100 for r in knn), knn
    ckpt = run / "checkpoints" / "step_00000006"
    assert (ckpt / "pytorch_model").is_dir(), sorted(p.name for p in ckpt.iterdir())  # DeepSpeed's format
    losses = [r["loss"] for r in records(run)]
    assert len(losses) == 6 and all(abs(x) < 1e3 for x in losses), losses  # finite: NaN fails the comparison
    saved = torch.load(ckpt / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)
    trained = saved["module"]
    assert float_dtypes(trained, "online.") == {torch.bfloat16} and float_dtypes(trained, "momentum.") == {torch.float32}
    assert saved["ds_config"]["gradient_clipping"] == 0.0  # optim.clip_grad_norm: null (accelerate's default: 1.0)
    assert load_file(str(ckpt / "smog.safetensors"))["groups"].dtype == torch.float32
    # The backbone exports from DeepSpeed's checkpoint (float32 master weights, merged by zero_to_fp32)
    # as from model.safetensors, self-checked through timm; in bf16 it is what the engine trained with.
    export_timm(run, tmp_path / "export", check_size=32, check_batch=1)
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert exported and all(torch.equal(v.to(trained[f"online.backbone.{k}"].dtype), trained[f"online.backbone.{k}"])
                            for k, v in exported.items())
    export_timm(run, tmp_path / "export_momentum", which="momentum", check_size=32, check_batch=1)
    exported = load_file(tmp_path / "export_momentum" / "model.safetensors")
    assert exported and all(torch.equal(v, trained[f"momentum.backbone.{k}"]) for k, v in exported.items())
    refused = launch_deepspeed(tmp_path / "lars", shards, "bf16", "optim.name=lars")
    assert refused.returncode != 0 and "optim.name=lars cannot run under DeepSpeed ZeRO" in refused.stderr
    refused = launch_deepspeed(tmp_path / "zero3", shards, "bf16", stage=3)
    assert refused.returncode != 0 and "smog_scale: error: DeepSpeed ZeRO stage 3 is not supported" in refused.stderr
    assert re.search(r"exitcode\s*: 2 ", refused.stderr) and not (tmp_path / "zero3" / "checkpoints").exists()


@pytest.mark.slow
def test_deepspeed_resume_on_another_world_size_is_refused(tmp_path, shards):
    """DeepSpeed's ZeRO checkpoints are partitioned over the processes that wrote them and DeepSpeed's loader
    cannot re-partition them: a resume on 2 -> 1 and 1 -> 2 processes exits 2 with one line saying what to do,
    before any work. The runs that wrote them: 2 and 1 DeepSpeed ranks on the CPU with the kNN monitor on and
    the recipe's gradient clipping in DeepSpeed's config."""
    runs = {2: tmp_path / "two", 1: tmp_path / "one"}
    for processes, run in runs.items():
        done = launch_deepspeed(run, shards, "bf16", "run.max_steps=2", "optim.clip_grad_norm=1.5", *monitor_on(shards),
                                processes=processes)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert [r["step"] for r in events(run, "knn")] == [2]
        saved = torch.load(run / "checkpoints" / "step_00000002" / "pytorch_model" / "mp_rank_00_model_states.pt",
                           weights_only=False)
        assert saved["ds_config"]["gradient_clipping"] == 1.5 and saved["dp_world_size"] == processes
    for saved, run in runs.items():
        processes = 3 - saved
        refused = launch_deepspeed(run, shards, "bf16", "run.max_steps=4", processes=processes)
        assert refused.returncode != 0
        errors = [line for line in refused.stderr.splitlines() if "smog_scale: error:" in line]
        assert errors == [
            f"smog_scale: error: run.resume: {run / 'checkpoints' / 'step_00000002'} holds DeepSpeed ZeRO state "
            f"partitioned over {saved} processes and this launch has {processes}; DeepSpeed cannot re-partition it: "
            f"resume with {saved} processes (optim.grad_accum_steps may change to fit the per-device batch)"], errors
        assert "ZeRORuntimeException" not in refused.stderr and len(records(run)) == 2
