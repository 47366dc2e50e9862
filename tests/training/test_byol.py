"""The BYOL control (``model.objective: byol``, docs/method.md "The BYOL control") through the trainer, in
process: it trains without any grouping work, checkpoints, resumes exactly and exports."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from smog_scale import train
from smog_scale.export.timm_export import export_timm
from tests.helpers import ROOT, TINY, final_state

RECIPE = ROOT / "recipes" / "demo_cpu.yaml"


def run_main(run: Path, shards: Path, *overrides: str) -> int:  # noqa: F811
    return train.main([str(RECIPE), f"run.output_dir={run}", f"data.train_shards={shards}", *TINY,
                       "model.objective=byol", *overrides])


def lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_byol_trains_resumes_and_exports_without_grouping(tmp_path, shards):  # noqa: F811
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_main(straight, shards, "run.max_steps=6") == 0
    assert run_main(resumed, shards, "run.max_steps=3") == 0
    assert run_main(resumed, shards, "run.max_steps=6") == 0
    a, b = final_state(straight), final_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [r for r in lines(straight) if "loss" in r]
    assert [r["loss"] for r in logged] == [r["loss"] for r in lines(resumed) if "loss" in r]
    assert len(logged) == 6 and all(0 <= r["loss"] <= 8 for r in logged)  # 2 x (2 - 2 cos) lies in [0, 8]
    assert not {"groups_used", "beta"} & set(logged[0])  # no group statistics are made
    messages = [r["message"] for r in lines(straight) if "message" in r]
    assert "re-grouping: never (model.objective=byol)" in messages
    assert not [r for r in lines(straight) if r.get("event") == "regroup"]
    assert not [m for m in messages if "re-grouping skipped" in m or "re-grouped" in m or "momentum encoder reset" in m]
    # G did not move from step 3 to 6 (TINY re-groups every 3 steps under SMoG, and commits every step) and
    # nothing was cached.
    at_3, at_6 = sorted((resumed / "checkpoints").glob("step_*"))
    assert torch.equal(load_file(str(at_3 / "smog.safetensors"))["groups"], b["groups"]) and not b["updates"].any()
    assert int(load_file(str(at_6 / "cache_rank0.safetensors"))["filled"]) == 0
    export_timm(straight, tmp_path / "export", check_size=32, check_batch=1)
    assert (tmp_path / "export" / "model.safetensors").is_file()
