import pytest
import torch
from torch import nn

from smog_scale.config import OptimConfig
from smog_scale.optim import build_optimizer, param_groups


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def test_bias_and_norm_parameters_get_no_decay():
    model = _model()
    frozen = nn.Linear(2, 2).requires_grad_(False)
    model.append(frozen)
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(16, 8), (4, 16)]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0
    assert all(p is not q for p in frozen.parameters() for q in decay["params"] + no_decay["params"])


def test_lars_trust_ratio_only_on_decayed_weights():
    """One LARS step against the formula: p -= lr * trust * (g + wd p) for weights, p -= lr * g for the rest."""
    model = _model()
    x = torch.randn(32, 8)
    model(x).pow(2).mean().backward()
    cfg = OptimConfig(name="lars", weight_decay=0.01, momentum=0.0, trust_coeff=0.001)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    build_optimizer(model, cfg, lr=0.5).step()
    for name, p in model.named_parameters():
        w, g = before[name], grads[name]
        if p.ndim > 1:
            trust = 0.001 * w.norm() / (g.norm() + 0.01 * w.norm())
            expected = w - 0.5 * trust * (g + 0.01 * w)
        else:
            expected = w - 0.5 * g
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_other_optimizers(name, cls):
    opt = build_optimizer(_model(), OptimConfig(name=name, weight_decay=0.05), lr=1e-3)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
