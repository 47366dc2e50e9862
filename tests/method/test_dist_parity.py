"""The distributed contract: W ranks with batch B each equal one process on the W*B batch."""

import pytest
import torch
import torch.nn.functional as F

from smog_scale.method.grouping import UPDATES
from smog_scale.method.health import label_churn
from smog_scale.method.loss import nt_xent
from smog_scale.method.objectives import grouping_step
from smog_scale.models.smog import SMoGOutput
from tests.helpers import EPS32, run_on_ranks, summation_atol

DIM_IN, DIM, NUM_GROUPS, BATCH, VIEWS = 12, 8, 6, 16, 4  # 2 global + 2 local views
UPDATE_COUNTS = torch.tensor([0, 1, 2, 3, 0, 5])  # the averaging rule's updates since the last re-grouping
# What each float64 result adds over both ranks' 2 * BATCH samples (the ranks add it in another order):
GROUP_TERMS = 2 * 2 * BATCH  # a group's mean: the global views' unit rows
LOSS_TERMS = (2 + 2 * 2) * 2 * BATCH  # the loss: one cross-entropy per (view, target) pair and sample
GRAD_TERMS = VIEWS * 2 * BATCH * NUM_GROUPS  # a weight's gradient: every view's row through every group's logit


def _problem():
    gen = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(DIM_IN if name != "pred" else DIM, DIM, generator=gen, dtype=torch.float64)
               for name in ("online", "pred", "momentum")}
    images = torch.randn(VIEWS, 2 * BATCH, DIM_IN, generator=gen, dtype=torch.float64)
    groups = F.normalize(torch.randn(NUM_GROUPS, DIM, generator=gen, dtype=torch.float64), dim=1)
    return weights, images, groups


def _step(images, update="momentum"):
    """A linear stand-in for the networks (no BN: the contract holds BN aside)."""
    weights, _, groups = _problem()
    params = {k: w.requires_grad_(True) for k, w in weights.items()}
    z = images @ params["online"]
    out = SMoGOutput(z=z, p=z @ params["pred"], e=(images[:2] @ params["momentum"]).detach())
    step = grouping_step(out, groups, beta=0.8, tau=0.1, update=update, updates=UPDATE_COUNTS)
    step.loss.backward()
    return step, {k: params[k].grad for k in ("online", "pred")}


def _rank_fn(rank, world):
    from smog_scale import dist

    _, images, _ = _problem()
    results = {}
    for update in UPDATES:
        step, grads = _step(images[:, rank * BATCH:(rank + 1) * BATCH], update)
        # what DDP does with parameter gradients: average over ranks
        grads = {k: dist.all_reduce_sum(g) / world for k, g in grads.items()}
        loss = dist.all_reduce_sum(step.loss.detach()) / world
        health = dist.all_reduce_sum(step.health) / world  # what RunLog logs: the mean over ranks
        results[update] = {"groups": step.new_groups.detach(), "counts": step.stats.counts, "loss": loss,
                           "health": health, **grads}
    loss, grad = _nt_xent_step(images[:2, rank * BATCH:(rank + 1) * BATCH])
    results["nt_xent"] = {"loss": dist.all_reduce_sum(loss) / world, "online": dist.all_reduce_sum(grad) / world}
    old, new = _relabelled()
    results["churn"] = label_churn(old[rank::world], new[rank::world], NUM_GROUPS)
    return results


def _nt_xent_step(images):
    """The instance warm-up's loss (docs/method.md "Instance warm-up") on the linear stand-in's global views."""
    online = _problem()[0]["online"].requires_grad_(True)
    loss = nt_xent(images @ online, tau=0.2)
    return loss.detach(), torch.autograd.grad(loss, online)[0]


def _relabelled():
    """Cached rows' groups under an old and a new G: relabelled, and 30% of the rows moved."""
    gen = torch.Generator().manual_seed(1)
    old = torch.randint(0, NUM_GROUPS, (200,), generator=gen)
    new = torch.randperm(NUM_GROUPS, generator=gen)[old]
    new[:60] = torch.randint(0, NUM_GROUPS, (60,), generator=gen)
    return old, new


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_concatenated_batch():
    """Every group-update rule (docs/method.md "Ablations") is synchronous: G' is the global batch's on every rank.
    The deterministic rules also give one process's loss and gradients; random_select draws its members
    differently (its keys come from each rank's generator), so there G' must be identical on both ranks and
    made of the global batch's members, one per group with members. The health signals are the global batch's
    too: the step's as the mean over ranks, the label churn over the union of the ranks' caches. The instance
    warm-up's NT-Xent is the global batch's as well."""
    _, images, _ = _problem()
    ranks = run_on_ranks(_rank_fn, 2)
    assert ranks[0]["churn"] == ranks[1]["churn"] == label_churn(*_relabelled(), NUM_GROUPS) > 0  # the union's
    # NT-Xent over the global batch: each rank's anchors against every rank's views (2 * 2 * BATCH - 1 terms each)
    loss, grad = _nt_xent_step(images[:2])
    for result in (r["nt_xent"] for r in ranks):
        torch.testing.assert_close(result["loss"], loss, rtol=0,
                                   atol=summation_atol(torch.float64, 4 * 2 * BATCH * 2 * BATCH, float(loss)))
        torch.testing.assert_close(result["online"], grad, rtol=0,
                                   atol=summation_atol(torch.float64, 4 * 2 * BATCH * 2 * BATCH, float(grad.abs().max())))
    for update in UPDATES:
        single, single_grads = _step(images, update)
        assert int((single.stats.counts > 0).sum()) > 2, "test needs several groups with members"
        first, second = (r[update] for r in ranks)
        assert torch.equal(first["groups"], second["groups"]), update
        assert torch.equal(first["counts"], single.stats.counts) and torch.equal(second["counts"], single.stats.counts)
        if update == "random_select":
            z_global = F.normalize(images[:2] @ _problem()[0]["online"], dim=-1).flatten(0, 1)
            moved = (first["groups"] != _problem()[2]).any(dim=1)
            members = (first["groups"][moved].unsqueeze(1) - z_global.unsqueeze(0)).abs().amax(dim=2).amin(dim=1)
            assert int(moved.sum()) == int((single.stats.counts > 0).sum()) and members.max() < 1e-12
            continue
        # float64 sums in another order: within summation_atol of each other (unit rows: magnitude 1)
        torch.testing.assert_close(first["groups"], single.new_groups.detach(), rtol=0,
                                   atol=summation_atol(torch.float64, GROUP_TERMS), msg=update)
        # the loss adds positive cross-entropies: their sum of magnitudes is the loss itself
        loss = single.loss.detach()
        torch.testing.assert_close(first["loss"], loss, rtol=0, atol=summation_atol(torch.float64, LOSS_TERMS, float(loss)),
                                   msg=update)
        # float32 shares of whole counts: the ranks' mean of 2 shares rounds 3 times, one process's share once
        torch.testing.assert_close(first["health"], single.health, rtol=4 * EPS32, atol=0, msg=update)
        for name, grad in single_grads.items():
            assert grad.abs().max() > 0
            # magnitude: the largest entry stands for the sum of |terms| (float64 leaves 100x margin either way)
            torch.testing.assert_close(first[name], grad, rtol=0, msg=f"{update} {name}",
                                       atol=summation_atol(torch.float64, GRAD_TERMS, float(grad.abs().max())))
