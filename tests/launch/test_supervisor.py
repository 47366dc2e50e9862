"""``smog-launch``: SLURM's pre-emption signals end a 2-process CPU job with a checkpoint and exit 0,
whether they reach every process of the job or only its top process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from smog_scale.launch import supervisor as launch
from tests.helpers import ROOT, TINY, records


def test_catches_reads_the_installed_handler():
    previous = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        assert not launch.catches(os.getpid(), signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, lambda *_: None)
        assert launch.catches(os.getpid(), signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_console_script_points_at_the_supervisor():
    assert 'smog-launch = "smog_scale.launch.supervisor:main"' in (ROOT / "pyproject.toml").read_text().splitlines()


def fake_slurm(bin_dir: Path) -> dict[str, str]:
    """A PATH on which ``srun`` runs its task as node 0 of 1 and ``smog-launch`` is this checkout's;
    returns the environment for examples/train.sbatch on 2 CPU trainers."""
    bin_dir.mkdir()
    shims = {"srun": 'while [[ $1 == --* ]]; do shift; done\nSLURM_NODEID=0 SLURM_NNODES=1 exec "$@"',
             "scontrol": "echo 127.0.0.1", "smog-launch": f'exec {sys.executable} -m smog_scale.launch "$@"'}
    for name, body in shims.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node0", GPUS_PER_NODE="2",
                PRECISION="no", MASTER_PORT="0", RECIPE="recipes/demo_cpu.yaml", ACCELERATE_USE_CPU="1",
                PYTHONUNBUFFERED="1")


@pytest.mark.slow
@pytest.mark.parametrize("signum, delivery", [(signal.SIGUSR1, "every process"), (signal.SIGUSR1, "top process"),
                                              (signal.SIGTERM, "every process")])
def test_preemption_saves_and_exits_0(tmp_path, shards, signum, delivery):
    """examples/train.sbatch under a one-node fake srun. SLURM's --signal=USR1@300 to every process of
    the job step (cgroup tracking: supervisor, launcher, trainers, loader workers) or to its top process
    alone; and SLURM's TERM to every process, where torchrun's agent would otherwise kill the trainers
    30 s later and exit non-zero."""
    run = tmp_path / "run"
    env = dict(fake_slurm(tmp_path / "bin"), RUN_DIR=str(run))
    proc = subprocess.Popen(["bash", "examples/train.sbatch", f"data.train_shards={shards}", *TINY, "optim.epochs=100"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    tree = [psutil.Process(proc.pid)]  # the batch shell; SLURM signals the job step's tasks, not this
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(records(run)) >= 2):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        task = tree[0].children()
        assert [" ".join(p.cmdline()[1:3]) for p in task] == ["-m smog_scale.launch"]  # exec'd to the top
        tree += task + task[0].children(recursive=True)  # torchrun starts each trainer in a session of its own
        for process in tree[1:] if delivery == "every process" else task:
            process.send_signal(signum)
        out, _ = proc.communicate(timeout=180)
    finally:
        for process in tree:  # an orphaned trainer holds stdout open and would outlive the test
            if process.is_running():
                process.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested" in out
    saved = sorted((run / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and not list((run / "checkpoints").glob(".tmp-*")), saved
    assert {"trainer_state.json", "cache_rank0.safetensors", "cache_rank1.safetensors", "model.safetensors",
            "optimizer.bin", "smog.safetensors"} <= {p.name for p in saved[0].iterdir()}
    step = json.loads((saved[0] / "trainer_state.json").read_text())["global_step"]
    assert 2 <= step < 500 and records(run)[-1]["step"] <= step
