"""Building a launch's state (``loop.build``): every rank starts from the same networks and G, and then draws its
own random numbers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import run_on_ranks, tiny_state


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
