"""The distributed contract: W ranks with batch B each equal one process on the W*B batch."""

import pytest
import torch
import torch.nn.functional as F

from gloo import run_on_ranks
from smog_scale.engine import grouping_step
from smog_scale.models.smog import SMoGOutput

DIM_IN, DIM, NUM_GROUPS, BATCH, VIEWS = 12, 8, 6, 16, 4  # 2 global + 2 local views


def _problem():
    gen = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(DIM_IN if name != "pred" else DIM, DIM, generator=gen, dtype=torch.float64)
               for name in ("online", "pred", "momentum")}
    images = torch.randn(VIEWS, 2 * BATCH, DIM_IN, generator=gen, dtype=torch.float64)
    groups = F.normalize(torch.randn(NUM_GROUPS, DIM, generator=gen, dtype=torch.float64), dim=1)
    return weights, images, groups


def _step(images):
    """A linear stand-in for the networks (no BN: the contract holds BN aside)."""
    weights, _, groups = _problem()
    params = {k: w.requires_grad_(True) for k, w in weights.items()}
    z = images @ params["online"]
    out = SMoGOutput(z=z, p=z @ params["pred"], e=(images[:2] @ params["momentum"]).detach())
    step = grouping_step(out, groups, beta=0.8, tau=0.1)
    step.loss.backward()
    return step, {k: params[k].grad for k in ("online", "pred")}


def _rank_fn(rank, world):
    from smog_scale import dist

    _, images, _ = _problem()
    step, grads = _step(images[:, rank * BATCH:(rank + 1) * BATCH])
    # what DDP does with parameter gradients: average over ranks
    grads = {k: dist.all_reduce_sum(g) / world for k, g in grads.items()}
    loss = dist.all_reduce_sum(step.loss.detach()) / world
    return {"groups": step.new_groups.detach(), "counts": step.counts, "loss": loss, **grads}


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_concatenated_batch():
    _, images, _ = _problem()
    single, single_grads = _step(images)
    assert int((single.counts > 0).sum()) > 2, "test needs several groups with members"
    ranks = run_on_ranks(_rank_fn, 2)
    for result in ranks:
        torch.testing.assert_close(result["groups"], single.new_groups.detach(), rtol=1e-5, atol=1e-12)
        assert torch.equal(result["counts"], single.counts)
        torch.testing.assert_close(result["loss"], single.loss.detach(), rtol=1e-5, atol=0)
        for name, grad in single_grads.items():
            assert grad.abs().max() > 0
            torch.testing.assert_close(result[name], grad, rtol=1e-5, atol=1e-12)
    assert torch.equal(ranks[0]["groups"], ranks[1]["groups"])
