import pytest
import torch
import torch.nn.functional as F

from smog_scale.method.loss import byol_loss, group_contrast_loss, nt_xent
from tests.helpers import summation_atol


def reference_loss(preds, labels, groups, tau):
    """Explicit list of (view, target) pairs, one cross-entropy each (docs/method.md step 4)."""
    groups = F.normalize(groups, dim=1)
    num_global = labels.shape[0]
    terms = []
    for v in range(preds.shape[0]):
        for t in range(num_global):
            if v < num_global and v == t:
                continue
            logits = F.normalize(preds[v], dim=1) @ groups.t() / tau
            terms.append(F.cross_entropy(logits, labels[t]))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("num_local", [0, 1, 6])
def test_matches_pair_reference(num_local):
    preds = torch.randn(2 + num_local, 8, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 30, (2, 8))
    groups = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    loss = group_contrast_loss(preds, labels, groups, 0.1)
    ref = reference_loss(preds, labels, groups, 0.1)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(loss, (preds, groups))
    ref_grads = torch.autograd.grad(reference_loss(preds, labels, groups, 0.1), (preds, groups))
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    loss32 = group_contrast_loss(preds.float(), labels, groups.float(), 0.1)
    # a float32 logit adds 16 products of unit rows, / tau; a cross-entropy moves by at most twice that
    torch.testing.assert_close(loss32.double(), ref, rtol=0, atol=2 * summation_atol(torch.float32, 16) / 0.1)


def test_bf16_inputs_within_1e_2():
    preds = torch.randn(4, 16, 32)
    labels = torch.randint(0, 50, (2, 16))
    groups = torch.randn(50, 32)
    ref = group_contrast_loss(preds, labels, groups)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = group_contrast_loss(preds.bfloat16(), labels, groups.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=1e-2, atol=0)  # bf16 rounds inputs by 2^-9; averaged, ~1 bf16 eps


def test_needs_two_global_views():
    with pytest.raises(ValueError, match="at least 2 global views"):
        group_contrast_loss(torch.randn(1, 4, 8), torch.zeros(1, 4, dtype=torch.long), torch.randn(3, 8))


def reference_byol(preds, targets):
    """BYOL's loss pair by pair: sum over ordered pairs (v, t), v != t, of mean_b ||p_v/|p_v| - e_t/|e_t|||^2,
    scaled to the two-view sum L(a, b) + L(b, a) (docs/method.md "The BYOL control")."""
    terms = []
    for v in range(preds.shape[0]):
        for t in range(targets.shape[0]):
            if v != t:
                diff = F.normalize(preds[v], dim=1) - F.normalize(targets[t], dim=1)
                terms.append((diff**2).sum(dim=1).mean())
    return 2 * torch.stack(terms).mean()


@pytest.mark.parametrize("num_local", [0, 1, 6])
def test_byol_matches_pair_reference_and_stops_gradient(num_local):
    preds = torch.randn(2 + num_local, 8, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(2, 8, 16, dtype=torch.float64, requires_grad=True)
    loss = byol_loss(preds, targets)
    torch.testing.assert_close(loss, reference_byol(preds, targets), rtol=1e-12, atol=0)
    grad, = torch.autograd.grad(loss, preds)
    torch.testing.assert_close(grad, torch.autograd.grad(reference_byol(preds, targets), preds)[0], rtol=1e-10, atol=1e-14)
    assert not torch.autograd.grad(loss, targets, allow_unused=True, materialize_grads=True)[0].any()  # stop-gradient
    if num_local == 0:  # BYOL's symmetrized loss: 2 - 2 cos(p_a, e_b) + 2 - 2 cos(p_b, e_a), batch means
        cos = F.cosine_similarity
        byol = (2 - 2 * cos(preds[0], targets[1])).mean() + (2 - 2 * cos(preds[1], targets[0])).mean()
        torch.testing.assert_close(loss, byol, rtol=1e-12, atol=0)
    low = byol_loss(preds.float(), targets.float())
    # 2 - 2 cos: a float32 cosine adds 16 products of unit rows (and normalizes them), x 2
    torch.testing.assert_close(low.double(), loss, rtol=0, atol=2 * summation_atol(torch.float32, 16 + 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = byol_loss(preds.detach().bfloat16(), targets.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), loss.detach(), rtol=1e-2, atol=0)  # bf16: 2^-9 a rounding


def reference_nt_xent(z, tau):
    """SimCLR's NT-Xent written per anchor: -log of the other view's share among every other view."""
    rows = F.normalize(z, dim=-1).flatten(0, 1)  # view a of every image, then view b
    batch, terms = z.shape[1], []
    for i in range(rows.shape[0]):
        others = [j for j in range(rows.shape[0]) if j != i]
        logits = torch.stack([rows[i] @ rows[j] for j in others]) / tau
        terms.append(-logits.log_softmax(0)[others.index((i + batch) % (2 * batch))])
    return torch.stack(terms).mean()


def test_nt_xent_matches_the_per_anchor_reference():
    z = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    loss = nt_xent(z, 0.2)
    torch.testing.assert_close(loss, reference_nt_xent(z, 0.2), rtol=1e-12, atol=0)
    grad, ref_grad = (torch.autograd.grad(f(z, 0.2), z)[0] for f in (nt_xent, reference_nt_xent))
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    z32 = z.detach().float().requires_grad_(True)
    torch.testing.assert_close(nt_xent(z32, 0.2), loss.detach().float(), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="exactly 2 views"):
        nt_xent(torch.randn(3, 6, 5), 0.2)


def test_nt_xent_rewards_views_that_match():
    aligned = torch.randn(1, 16, 8).expand(2, 16, 8)
    assert nt_xent(aligned, 0.2) < nt_xent(torch.randn(2, 16, 8), 0.2)
