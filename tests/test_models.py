import pytest
import torch

from smog_scale import momentum
from smog_scale.models.backbone import build_backbone
from smog_scale.models.smog import SMoGModel


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SMoGModel("test_resnet", proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)


def test_multi_resolution_forward_shapes_and_gradients(model):
    crops = [torch.randn(2, 4, 3, 64, 64), torch.randn(3, 4, 3, 32, 32)]
    out = model(crops)
    assert out.z.shape == (5, 4, 16) and out.p.shape == (5, 4, 16) and out.e.shape == (2, 4, 16)
    assert not out.e.requires_grad and out.p.requires_grad
    assert all(not p.requires_grad for p in model.momentum.parameters())


def test_ema_update_matches_formula_and_reset_copies(model):
    model.online.projector[0].weight.data.add_(1.0)  # make online and momentum differ
    before_m = [p.clone() for p in model.momentum.parameters()]
    online = [p.clone() for p in model.online.parameters()]
    model.update_momentum(0.9)
    for new, old, o in zip(model.momentum.parameters(), before_m, online):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * o)
    model.reset_momentum()
    for m_t, o_t in zip(model.momentum.state_dict().values(), model.online.state_dict().values()):
        assert torch.equal(m_t, o_t)


def test_reset_rejects_mismatched_encoders():
    with pytest.raises(ValueError, match="differ"):
        momentum.reset(torch.nn.Linear(2, 3), torch.nn.Linear(3, 3))


@pytest.mark.parametrize("name, millions, features", [("resnet50x2", 93.9, 4096), ("resnet50x4", 375.1, 8192)])
def test_wide_resnets_are_registered_timm_models(name, millions, features):
    with torch.device("meta"):
        backbone = build_backbone(name)
    assert backbone.num_features == features
    assert sum(p.numel() for p in backbone.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="resnet51"):
        build_backbone("resnet51")
