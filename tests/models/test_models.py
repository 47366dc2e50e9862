import pytest
import torch

from smog_scale.models import ema
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
        # lerp against the formula: 3 roundings of weights < 1; float32 defaults (1e-5 + 1.3e-6 |x|) hold them
        torch.testing.assert_close(new, 0.9 * old + 0.1 * o)
    model.reset_momentum()
    for m_t, o_t in zip(model.momentum.state_dict().values(), model.online.state_dict().values()):
        assert torch.equal(m_t, o_t)


def test_reset_rejects_mismatched_encoders():
    with pytest.raises(ValueError, match="differ"):
        ema.reset(torch.nn.Linear(2, 3), torch.nn.Linear(3, 3))


@pytest.mark.parametrize("name, millions, features", [("resnet50x2", 93.9, 4096), ("resnet50x4", 375.1, 8192)])
def test_wide_resnets_are_registered_timm_models(name, millions, features):
    with torch.device("meta"):
        backbone = build_backbone(name)
    assert backbone.num_features == features
    assert sum(p.numel() for p in backbone.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="resnet51"):
        build_backbone("resnet51")


def test_momentum_encoder_is_deterministic_in_train_mode():
    """Stochastic depth and dropout (Swin's drop_path_rate) perturb the online encoder, never the momentum
    encoder that makes the labels; its BatchNorm layers still use batch statistics."""
    torch.manual_seed(0)
    swin = dict(img_size=32, patch_size=4, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 1),
                drop_path_rate=0.5, drop_rate=0.3)
    model = SMoGModel("swin_tiny_patch4_window7_224", proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32,
                      backbone_kwargs=swin).train()
    crops = [torch.randn(2, 4, 3, 32, 32)]
    first, second = model(crops), model(crops)
    assert not torch.equal(first.z, second.z)  # the online encoder is stochastic here
    assert torch.equal(first.e, second.e)
    norms = [m for m in model.momentum.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms and all(m.training for m in norms)
    assert not any(m.training for m in model.momentum.modules() if not isinstance(m, torch.nn.BatchNorm1d))
    model.eval()
    assert not any(m.training for m in model.modules())


def test_bf16_weights_leave_the_momentum_encoder_float32():
    """As DeepSpeed leaves the model (every parameter bf16, no autocast): ``settle_dtypes`` keeps the
    momentum encoder float32, the forward takes float32 crops, and the EMA by 1 - m = 0.001 moves the
    momentum weights as in float32, where a bf16 EMA would mostly round to no change."""
    torch.manual_seed(0)
    model = SMoGModel("test_resnet", proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)  # DeepSpeed's cast: parameters only
    model.settle_dtypes()
    assert {t.dtype for t in model.momentum.state_dict().values() if t.is_floating_point()} == {torch.float32}
    assert {t.dtype for t in model.online.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    out = model([torch.randn(2, 4, 3, 32, 32), torch.randn(1, 4, 3, 16, 16)])
    assert out.z.dtype == out.e.dtype == torch.bfloat16
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(0.05)
    before = [p.clone() for p in model.momentum.parameters()]
    model.update_momentum(0.999)
    for new, old, online in zip(model.momentum.parameters(), before, model.online.parameters()):
        # the same float32 lerp of weights < 1: a rounding or two, 1e-6 = 8 eps
        torch.testing.assert_close(new, torch.lerp(old, online.float(), 0.001), rtol=0, atol=1e-6)
    old, online = (torch.cat([p.flatten() for p in ps]) for ps in (before, model.online.parameters()))
    stalled = torch.lerp(old.bfloat16(), online, 0.001) == old.bfloat16()
    assert stalled.float().mean() > 0.5  # why: in bf16 most weights would not move at all (78% here)
