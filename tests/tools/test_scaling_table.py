"""tools/scaling_table.py as a new user runs it: recipe names, impossible world sizes, one-line errors.
(Its formulas and crossovers are checked in training/test_scale.py.)"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.helpers import ROOT


@pytest.fixture
def tool(monkeypatch):
    spec = importlib.util.spec_from_file_location("scaling_table", ROOT / "tools" / "scaling_table.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "scaling_table", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_recipe_name_works_and_refused_world_sizes_are_left_out(tool, capsys):
    assert tool.main(["--recipe", "demo_cpu", "--no-reference"]) == 0  # global batch 32: 8 GPUs of 4
    out = capsys.readouterr().out
    assert "K = 30, D = 64, cache union U = 640 rows" in out and "| 8 | 4 | 20.6 KiB |" in out
    assert "| 64 |" not in out and "optim.global_batch_size=32 is not divisible by world size 64" in out
    assert tool.main(["--recipe", "demo_cpu.yaml", "--worlds", "1", "2", "--no-reference"]) == 0
    assert "| 2 | 16 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--worlds", "3"], "scaling_table: error: optim.global_batch_size=4096 is not divisible by world size 3"),
    (["--recipe", "nope"], "scaling_table: error: no recipe 'nope': give a recipe file or one of byol_r50_400ep, demo_cpu, r50_400ep"),
    (["--recipe", "r50_400ep", "--worlds", "8", "6"], "scaling_table: error: optim.global_batch_size=2048 is not "
                                                      "divisible by world size 6"),
])
def test_launches_the_trainer_refuses_are_one_line_errors(tool, capsys, argv, message):
    assert tool.main([*argv, "--no-reference"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().splitlines() == [captured.err.strip()]
    assert captured.err.startswith(message), captured.err


@pytest.mark.parametrize("worlds", [["0"], ["-4"], ["two"]])
def test_world_sizes_must_be_positive_integers(tool, capsys, worlds):
    with pytest.raises(SystemExit) as info:
        tool.main(["--worlds", *worlds])
    assert info.value.code == 2 and "--worlds" in capsys.readouterr().err
