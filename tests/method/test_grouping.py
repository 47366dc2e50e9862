import pytest
import torch
import torch.nn.functional as F

from smog_scale.method.grouping import (
    UPDATES,
    GroupBank,
    assign,
    group_statistics,
    group_update,
    merge_statistics,
    momentum_update,
    updated_groups,
)
from tests.helpers import assert_argmax_up_to_rounding, summation_atol


def reference_assign(groups, feats):
    """Plain loop: for each feature, the group with the largest cosine similarity."""
    unit_groups = F.normalize(groups, dim=1)
    return torch.tensor([int((unit_groups @ F.normalize(f, dim=0)).argmax()) for f in feats])


def reference_update(groups, feats, beta):
    """Plain per-group loop of docs/method.md step 3."""
    c = reference_assign(groups, feats)
    new = groups.clone()
    for k in range(groups.shape[0]):
        members = feats[c == k]
        if len(members):
            new[k] = beta * groups[k] + (1 - beta) * members.mean(dim=0)
    return new


@pytest.mark.parametrize("num_groups", [7, 300, 3000])
def test_assign_and_update_match_loop_reference(num_groups):
    gen = torch.Generator().manual_seed(num_groups)
    groups = F.normalize(torch.randn(num_groups, 16, generator=gen, dtype=torch.float64), dim=1)
    feats = F.normalize(torch.randn(64, 16, generator=gen, dtype=torch.float64), dim=1)
    c = assign(groups, feats)
    assert c.dtype == torch.long
    assert torch.equal(c, reference_assign(groups, feats))
    new = momentum_update(groups, feats, 0.9)
    torch.testing.assert_close(new, reference_update(groups, feats, 0.9), rtol=1e-12, atol=1e-12)
    empty = torch.ones(num_groups, dtype=torch.bool)
    empty[c] = False
    assert empty.sum() >= max(num_groups - 64, 0)
    assert torch.equal(new[empty], groups[empty]), "groups without members must stay unchanged"
    assert not torch.equal(new[~empty], groups[~empty])


def test_assign_in_blocks_equals_one_matmul():
    groups = F.normalize(torch.randn(3000, 32), dim=1)
    feats = torch.randn(4000, 32)  # 3 blocks of 1398 rows
    exact = feats.double() @ F.normalize(groups.double(), dim=1).t()
    # a float32 similarity: 32 products (and the groups' renormalization), magnitude up to the feature's norm
    atol = summation_atol(torch.float32, 32 + 2, float(feats.norm(dim=1).max()))
    assert_argmax_up_to_rounding(assign(groups, feats), exact, atol)


def test_update_float32_matches_reference_within_tolerance():
    groups = F.normalize(torch.randn(300, 128), dim=1)
    feats = F.normalize(torch.randn(1024, 128), dim=1)
    ref = reference_update(groups.double(), feats.double(), 0.99).float()
    # a group's mean adds its members' unit rows (then 2 more roundings): the largest group bounds the terms
    members = int(torch.bincount(reference_assign(groups.double(), feats.double())).max())
    torch.testing.assert_close(momentum_update(groups, feats, 0.99), ref, rtol=0,
                               atol=summation_atol(torch.float32, members + 2))


def test_gradient_flows_through_update_term_not_argmax():
    groups = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1)
    feats = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    beta = 0.7
    new = momentum_update(groups, feats, beta)
    weights = torch.randn_like(new)
    (new * weights).sum().backward()
    # Analytic gradient with the assignment held fixed: d g'_k / d z_i = (1 - beta) / n_k for i in k.
    c = assign(groups, feats)
    counts = torch.bincount(c, minlength=5).double()
    expected = (1 - beta) * weights[c] / counts[c].unsqueeze(1)
    torch.testing.assert_close(feats.grad, expected)
    assert not assign(groups, feats).requires_grad


def test_no_gradient_when_beta_is_one():
    feats = torch.randn(10, 4, requires_grad=True)
    momentum_update(F.normalize(torch.randn(3, 4), dim=1), feats, 1.0).sum().backward()
    assert torch.count_nonzero(feats.grad) == 0


def test_dimension_mismatch_names_both_numbers():
    with pytest.raises(ValueError, match=r"128 != 64"):
        momentum_update(torch.randn(10, 128), torch.randn(4, 64), 0.9)
    with pytest.raises(ValueError, match=r"128 != 64"):
        assign(torch.randn(10, 128), torch.randn(4, 64))


def test_group_bank_commits_only_finite_steps():
    bank = GroupBank(4, 3)
    before = bank.groups.clone()
    bank.commit(torch.full((4, 3), float("nan")), torch.tensor(False))
    assert torch.equal(bank.groups, before)
    new = torch.randn(4, 3)
    bank.commit(new, torch.tensor(True))
    torch.testing.assert_close(bank.groups, F.normalize(new, dim=1))
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(4, 3\)"):
        bank.set(torch.randn(5, 3))


def reference_rule(groups, feats, rule, beta=0.9, updates=None, picks=None):
    """Plain per-group loop of the four update rules (docs/method.md "Ablations"); ``picks`` maps a group to
    the index of its randomly selected member."""
    c = reference_assign(groups, feats)
    new = groups.clone()
    for k in range(groups.shape[0]):
        members = feats[c == k]
        if not len(members):
            continue
        mean = members.mean(dim=0)
        if rule == "momentum":
            new[k] = beta * groups[k] + (1 - beta) * mean
        elif rule == "adopt_latest":
            new[k] = mean
        elif rule == "averaging":
            n = int(updates[k]) + 1  # updates since the re-grouping, this one included
            new[k] = groups[k] + (mean - groups[k]) / n
        else:
            new[k] = feats[picks[k]]
    return new


def _problem(num_groups=6, batch=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = F.normalize(torch.randn(num_groups, 8, generator=gen, dtype=torch.float64), dim=1)
    feats = F.normalize(torch.randn(batch, 8, generator=gen, dtype=torch.float64), dim=1)
    return groups, feats, torch.randint(0, 4, (num_groups,), generator=gen)


@pytest.mark.parametrize("rule", UPDATES)
def test_update_rules_match_loop_reference(rule):
    groups, feats, updates = _problem()
    c = assign(groups, feats)
    update = group_update(groups, feats, c, 0.9, rule, updates)
    picks = None
    if rule == "random_select":  # which member won is random: read it off the result, then check it is a member
        hits = (update.new_groups.unsqueeze(1) == feats.unsqueeze(0)).all(dim=2)  # [K, B]
        picks = {k: int(hits[k].nonzero()[0]) for k in range(groups.shape[0]) if hits[k].any()}
        assert all(int(c[i]) == k for k, i in picks.items())
        assert set(picks) == set(c.tolist())  # every group with members took one of them
    torch.testing.assert_close(update.new_groups, reference_rule(groups, feats, rule, 0.9, updates, picks),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule", UPDATES)
def test_update_rules_gradient(rule):
    """What flows back from g' (docs/method.md "Ablations"): (1 - beta) / n_k into every member for momentum,
    1 / n_k for adopt_latest, 1 / (u_k n_k) for averaging, everything into the one picked member for random_select."""
    groups, feats, updates = _problem()
    feats.requires_grad_(True)
    c = assign(groups, feats)
    new = group_update(groups, feats, c, 0.7, rule, updates).new_groups
    weights = torch.randn_like(new)
    (new * weights).sum().backward()
    n = torch.bincount(c, minlength=groups.shape[0]).double()[c].unsqueeze(1)
    scale = {"momentum": 0.3 / n, "adopt_latest": 1 / n, "averaging": 1 / ((updates[c] + 1).unsqueeze(1) * n)}
    if rule == "random_select":
        picked = (new.detach()[c] == feats.detach()).all(dim=1)
        assert int(picked.sum()) == len(set(c.tolist()))
        torch.testing.assert_close(feats.grad[picked], weights[c][picked])
        assert torch.count_nonzero(feats.grad[~picked]) == 0
    else:
        torch.testing.assert_close(feats.grad, scale[rule] * weights[c])


def test_random_select_is_uniform_over_members():
    feats = torch.eye(4, dtype=torch.float64)  # 4 members of group 0
    groups = torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, -1]], dtype=torch.float64)
    c = torch.zeros(4, dtype=torch.long)
    torch.manual_seed(0)
    wins = torch.stack([group_update(groups, feats, c, 0.9, "random_select").new_groups[0] for _ in range(4000)])
    frequencies = wins.sum(dim=0) / 4000
    assert torch.all((frequencies - 0.25).abs() < 0.03), frequencies
    assert torch.equal(group_update(groups, feats, c, 0.9, "random_select").new_groups[1], groups[1])


def test_merged_micro_batches_equal_the_whole_batch():
    """Two micro-batches' statistics merged: the sums and counts of the whole batch, and a pick that is one
    of the two micro-batches' picks (the one with the larger key)."""
    groups, feats, _ = _problem(batch=40)
    c = assign(groups, feats)
    whole = group_statistics(6, feats, c)
    halves = [group_statistics(6, feats[i:i + 20], c[i:i + 20], "random_select") for i in (0, 20)]
    merged = merge_statistics(*halves)
    torch.testing.assert_close(merged.sums, whole.sums, rtol=1e-12, atol=1e-12)
    assert torch.equal(merged.counts, whole.counts)
    first_wins = halves[0].pick_keys >= halves[1].pick_keys
    assert torch.equal(merged.picks, torch.where(first_wins.unsqueeze(1), halves[0].picks, halves[1].picks))
    assert torch.equal(merged.pick_keys, torch.maximum(*(h.pick_keys for h in halves)))


def test_averaging_commits_average_the_step_means_since_the_regrouping():
    bank = GroupBank(3, 4)
    centroids = F.normalize(torch.randn(3, 4), dim=1)
    bank.updates.fill_(7)
    bank.set(centroids)
    assert torch.equal(bank.updates, torch.zeros(3, dtype=torch.long))
    feats = F.normalize(torch.randn(3, 4), dim=1)
    c = torch.tensor([0, 0, 1])  # group 2 has no member: neither moves nor counts an update
    for step in range(3):
        stats = group_statistics(3, feats, c)
        bank.commit(updated_groups(bank.groups, stats, 0.9, "averaging", bank.updates), counts=stats.counts)
    assert bank.updates.tolist() == [3, 3, 0]
    torch.testing.assert_close(bank.groups[2], centroids[2])
    mean = F.normalize(feats[:2].mean(dim=0), dim=0)  # the same features each step: the step means' average
    # 3 commits of 4-d unit rows and a 4-term dot product: a few roundings of values <= 1
    assert torch.allclose(bank.groups[0] @ mean, torch.tensor(1.0), atol=summation_atol(torch.float32, 3 * 4 + 4))
    bank.commit(bank.groups, torch.tensor(False), counts=torch.ones(3, dtype=torch.long))
    assert bank.updates.tolist() == [3, 3, 0]  # a skipped step counts nothing
