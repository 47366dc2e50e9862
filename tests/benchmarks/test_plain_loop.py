"""The step benchmark's plain loop (benchmarks/plain_loop.py) does the trainer's work: from the same seed its steps
give the trainer's losses, weights, groups and cache on the same batches."""

from __future__ import annotations

import sys

import pytest
import torch

from smog_scale.training.step import train_step
from tests.helpers import BATCH, ROOT, synthetic_batch, tiny_state

sys.path.insert(0, str(ROOT / "benchmarks"))

from plain_loop import PlainSMoG, load_images  # noqa: E402


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_plain_steps_equal_the_trainer_steps(tmp_path, shards, optimizer: str) -> None:
    state = tiny_state(tmp_path, shards, f"optim.name={optimizer}", "grouping.regroup_every=0",
                       "grouping.reset_momentum=false")
    plain = PlainSMoG(state.cfg, state.derived)
    model = state.accelerator.unwrap_model(state.model)
    torch.testing.assert_close(plain.model.state_dict(), model.state_dict(), rtol=0, atol=0)  # same seed, same order
    torch.testing.assert_close(plain.groups, state.bank.groups, rtol=0, atol=0)
    for step in range(3):
        batch = synthetic_batch(step, 0)
        end = train_step(state, batch)
        assert end is not None and end.committed
        loss = plain.step(batch["crops"], step)
        torch.testing.assert_close(loss.detach(), end.metrics["loss"])
    torch.testing.assert_close(plain.model.state_dict(), model.state_dict())  # online, predictor and momentum
    torch.testing.assert_close(plain.groups, state.bank.groups)
    feats, _ = state.cache.contents()
    torch.testing.assert_close(plain.cache[: feats.shape[0]], feats)
    assert plain.cached == feats.shape[0] == 3 * 2 * BATCH  # 3 steps of 2 global views


def test_load_images_reads_every_sample(shards) -> None:
    images = load_images(shards)
    assert len(images) == 80 and all(image[:2] == b"\xff\xd8" for image in images)  # 8 per class, JPEG
