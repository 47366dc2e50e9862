import pytest
import torch
from torch import nn

from smog_scale.config.schema import OptimConfig
from smog_scale.models.smog import SMoGModel
from smog_scale.training.optim import build_optimizer, param_groups
from tests.helpers import EPS32, summation_atol

# A two-stage Swin at 32 px: the same timm class (and no_weight_decay()) as the Swin-T recipes.
TINY_SWIN = {"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2), "img_size": 32, "window_size": 4,
             "patch_size": 4}


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


def test_swin_relative_position_bias_tables_get_no_decay():
    """Swin's 2-D relative_position_bias_table is in timm's no_weight_decay() (as in MoBY): no decay,
    found through the nested names of the SMoG model; every other matrix decays; the frozen momentum
    encoder is in no group."""
    model = SMoGModel("swin_tiny_patch4_window7_224", 32, 8, 32, TINY_SWIN)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = sorted(names[id(p)] for p in no_decay["params"] if p.ndim > 1)
    assert exempt == ["online.backbone.layers.0.blocks.0.attn.relative_position_bias_table",
                      "online.backbone.layers.1.blocks.0.attn.relative_position_bias_table"]
    assert all(p.ndim > 1 and "relative_position" not in names[id(p)] for p in decay["params"])
    grouped = {names[id(p)] for g in (decay, no_decay) for p in g["params"]}
    assert grouped == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("momentum.") for n in grouped)


def test_no_weight_decay_keywords_of_moby_style_models():
    """MoBY's Swin names keywords instead: every parameter whose name contains one skips decay."""
    class MobyStyle(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.zeros(3, 2))
            self.proj = nn.Linear(2, 2)

        def no_weight_decay_keywords(self):
            return {"table"}

    model = nn.Sequential(nn.Linear(2, 2), MobyStyle())
    decay, no_decay = param_groups(model, 0.05)
    assert [p.shape for p in decay["params"]] == [(2, 2), (2, 2)]
    assert any(p is model[1].table for p in no_decay["params"])


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
        # the trust ratio's norms add numel squares (other order in timm's LARS); w - update rounds once a side
        atol = summation_atol(torch.float32, w.numel(), float((w - expected).abs().max()))
        torch.testing.assert_close(p.detach(), expected, rtol=2 * EPS32, atol=atol)


def test_lars_skips_decay_and_trust_ratio_on_swin_bias_tables():
    """A LARS step on the tiny Swin: the bias tables move by exactly -lr * grad (no decay, no trust ratio)."""
    torch.manual_seed(0)
    model = SMoGModel("swin_tiny_patch4_window7_224", 32, 8, 32, TINY_SWIN)
    model.online(torch.randn(4, 3, 32, 32)).pow(2).mean().backward()
    tables = [(p, p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()
              if "relative_position_bias_table" in n and p.grad is not None]
    assert len(tables) == 2
    build_optimizer(model, OptimConfig(name="lars", weight_decay=0.5, momentum=0.0), lr=0.5).step()
    for p, w, g in tables:
        torch.testing.assert_close(p.detach(), w - 0.5 * g, rtol=2 * EPS32, atol=0)  # one rounding a side


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_other_optimizers(name, cls):
    opt = build_optimizer(_model(), OptimConfig(name=name, weight_decay=0.05), lr=1e-3)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
