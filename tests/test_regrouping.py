"""Re-grouping and momentum resets in the trainer's step loop, in process: the four rows of the paper's
Table 7b (docs/method.md "Ablations")."""

from __future__ import annotations

import pytest
import torch
from steps import BATCH, synthetic_batch, tiny_state
from test_train import shards  # noqa: F401  (module fixture)

from smog_scale import regrouping
from smog_scale.engine import TrainState, train_step


class Log:
    """What RunLog would report: messages and the steps of re-groupings."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.regroups: list[int] = []

    def message(self, text: str) -> None:
        self.messages.append(text)

    def regroup(self, state: TrainState, result: object) -> None:
        self.regroups.append(state.global_step)


def momentum_is_online(state: TrainState) -> bool:
    model = state.accelerator.unwrap_model(state.model)
    return all(torch.equal(a, b) for a, b in zip(model.online.state_dict().values(), model.momentum.state_dict().values()))


ROWS = {  # Table 7b row: (overrides, steps re-grouped, steps after which the momentum encoder is the online one)
    "none": (["grouping.regroup_every=0", "grouping.reset_momentum=false"], [], []),
    "clustering": (["grouping.reset_momentum=false"], [2, 4], []),
    "clustering_and_reset": ([], [2, 4], [2, 4]),
    "reset_alone": (["grouping.regroup_every=0", "grouping.reset_every=2"], [], [2, 4]),
}


@pytest.mark.parametrize("row", ROWS)
def test_table_7b_rows(tmp_path, shards, row):  # noqa: F811
    overrides, regrouped, reset = ROWS[row]
    state = tiny_state(tmp_path, shards, "grouping.regroup_every=2", *overrides)
    log, was_reset = Log(), []
    for step in range(4):
        train_step(state, synthetic_batch(step, 0))
        before = state.bank.groups.clone()
        regrouping.after_step(state, log)
        if state.global_step in regrouped:  # G replaced by the centroids, no group updated since
            assert not torch.equal(state.bank.groups, before) and not state.bank.updates.any()
        else:
            assert torch.equal(state.bank.groups, before)
        if momentum_is_online(state):
            was_reset.append(state.global_step)
    assert log.regroups == regrouped and was_reset == reset
    assert sum("momentum encoder reset" in m for m in log.messages) == (len(reset) if row == "reset_alone" else 0)
    if not regrouped:
        assert state.bank.updates.max() == 4  # never re-grouped: counts since the start
    assert BATCH * 2 * 4 == int(state.cache.filled)
