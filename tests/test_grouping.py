import pytest
import torch
import torch.nn.functional as F

from smog_scale.grouping import GroupBank, assign, momentum_update


def reference_assign(groups, feats):
    """Plain loop: for each feature, the group with the largest cosine similarity."""
    unit_groups = F.normalize(groups, dim=1)
    return torch.tensor([int((unit_groups @ F.normalize(f, dim=0)).argmax()) for f in feats])


def reference_update(groups, feats, beta):
    """Plain per-group loop of ALGORITHM.md step 3."""
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
    assert torch.equal(assign(groups, feats), (feats @ groups.t()).argmax(dim=1))


def test_update_float32_matches_reference_within_tolerance():
    groups = F.normalize(torch.randn(300, 128), dim=1)
    feats = F.normalize(torch.randn(1024, 128), dim=1)
    ref = reference_update(groups.double(), feats.double(), 0.99).float()
    torch.testing.assert_close(momentum_update(groups, feats, 0.99), ref, rtol=1e-5, atol=1e-6)


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
