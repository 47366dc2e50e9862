"""tools/selfcheck.py: the check runner in-process, and the whole self-check on CPU (1 and 2 processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from smog_scale.config.validation import load_config
from smog_scale.launch import selfcheck
from smog_scale.launch.selfcheck import Context
from smog_scale.launch.selfcheck_runner import Check, Failed, Skipped, run_checks, table
from tests.helpers import ROOT, TINY

# TINY's run settings are the self-check's own; the model, crops and loader stay tiny.
TINY_MODEL = [o for o in TINY if o.startswith(("model.", "data.crops", "data.num_workers"))]


def _context(tmp_path) -> Context:
    recipe = str(ROOT / "recipes" / "demo_cpu.yaml")
    return Context(recipe, [], tmp_path, load_config(recipe, ["data.train_shards=unused"]))


def _fails(_ctx: Context) -> str:
    raise Failed("found 3, expected 4")


def _skips(_ctx: Context) -> str:
    raise Skipped("no CUDA device")


def _crashes(_ctx: Context) -> str:
    raise KeyError("peak_memory_gb")


def test_runner_reports_pass_fail_skip_and_dependencies(tmp_path):
    checks = (Check("a", lambda ctx: "fine"), Check("b", _fails), Check("c", lambda ctx: "unreached", ("b",)),
              Check("d", _skips), Check("e", _crashes, main_only=True), Check("f", lambda ctx: "also fine", ("a",)))
    rows = run_checks(_context(tmp_path), checks)
    assert [(r["check"], r["ok"], r["detail"]) for r in rows] == [
        ("a", True, "fine"), ("b", False, "found 3, expected 4"), ("c", None, "skipped: needs b"),
        ("d", None, "skipped: no CUDA device"), ("e", False, "KeyError: 'peak_memory_gb'"), ("f", True, "also fine")]
    assert all(set(r) == {"check", "ok", "seconds", "detail"} and r["seconds"] >= 0 for r in rows)
    lines = table(rows).splitlines()
    assert lines[0].split() == ["check", "ok", "seconds", "detail"] and lines[2].split()[:2] == ["b", "FAIL"]
    assert lines[3].split()[:2] == ["c", "skip"]


def test_bad_recipe_exits_2_before_any_check(tmp_path, capsys):
    assert selfcheck.main([str(ROOT / "recipes" / "demo_cpu.yaml"), "optim.lr=1", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("selfcheck: error: unknown key 'optim.lr'; did you mean "
                                               "optim.base_lr?")
    assert not (tmp_path / "selfcheck.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_selfcheck_passes_on_cpu(tmp_path, processes):
    """The whole self-check with demo_cpu.yaml (tiny model), as a user runs it: plain python, and under
    accelerate launch with 2 CPU processes. Checks that need a GPU or DeepSpeed are skipped, not passed."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", ACCELERATE_USE_CPU="1")
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
              "--num_cpu_threads_per_process", "1"] if processes == 2 else []
    cmd = [sys.executable, *launch, str(ROOT / "tools" / "selfcheck.py"), str(ROOT / "recipes" / "demo_cpu.yaml"),
           *TINY_MODEL, "--out", str(tmp_path)]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "selfcheck.json").read_text())
    assert [r["check"] for r in rows] == [c.name for c in selfcheck.CHECKS]
    outcome = {r["check"]: (r["ok"], r["detail"]) for r in rows}
    assert outcome["faiss on the GPU"] == (None, "skipped: no CUDA device")
    assert outcome["DeepSpeed"] == (None, "skipped: the launch does not use DeepSpeed")
    assert all(ok for name, (ok, _) in outcome.items() if name not in ("faiss on the GPU", "DeepSpeed")), rows
    assert f"{processes} process(es) on CPU" in outcome["environment"][1]
    assert f"the feature caches of {processes} rank(s)" in outcome["checkpoint"][1]
    assert "k-means at steps [1, 2, 4]" in outcome["train + re-grouping"][1]
    assert f"{32 // processes} images per device x {processes}" in outcome["full per-device batch"][1]
    assert "check" in done.stdout and "images/s per device" in done.stdout
