"""Export to timm: round trips key for key (R50, R50x2, Swin-T), strict loading and clear errors on bad input."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from smog_scale import config
from smog_scale.export import export_timm, load_eval_backbone, resolve_checkpoint
from smog_scale.models.smog import SMoGModel

TOOLS = Path(__file__).parent.parent / "tools"
HEADS = dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)


def make_run(root: Path, backbone: str, backbone_kwargs: dict | None = None, image_size: int = 64,
             steps: tuple[int, ...] = (7,), wrapper_prefix: str = "") -> SMoGModel:
    """A run folder as the trainer leaves it: config.yaml plus checkpoints/step_*/ holding a SMoGModel's
    state dict (BN statistics and the momentum encoder made to differ from their defaults / the online one)."""
    torch.manual_seed(1)  # not the seed of --random-init
    model = SMoGModel(backbone, backbone_kwargs=backbone_kwargs, **HEADS)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_mean"):
                tensor.uniform_(-0.1, 0.1)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
        for p in model.momentum.parameters():
            p.add_(0.01)
    model_cfg = config.ModelConfig(backbone=backbone, backbone_kwargs=backbone_kwargs or {}, **HEADS)
    crops = [dict(size=image_size, count=2, scale=[0.14, 1.0])]
    root.mkdir(parents=True)
    config.dump(config.Config(model=model_cfg, data=config.DataConfig(train_shards="x.tar", crops=crops)),
                root / "config.yaml")
    state = {wrapper_prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    for step in steps:
        path = root / "checkpoints" / f"step_{step:08d}"
        path.mkdir(parents=True)
        save_file(state, str(path / "model.safetensors"))
        save_file({"groups": torch.nn.functional.normalize(torch.randn(5, 16), dim=1)}, str(path / "smog.safetensors"))
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "world_size": 1}))
    return model.eval()


ARCHS = {  # name: (backbone_kwargs, trained crop size, self-check size)
    "resnet50": ({}, 64, 64),
    "resnet50x2": ({}, 64, 32),
    "swin_tiny_patch4_window7_224": ({"drop_path_rate": 0.1}, 224, 224),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def exported(request, tmp_path_factory):
    """(architecture, its SMoGModel, the export result) built once per module and architecture."""
    name = request.param
    kwargs, image_size, check_size = ARCHS[name]
    root = tmp_path_factory.mktemp(name)
    model = make_run(root / "run", name, kwargs, image_size)
    result = export_timm(root / "run", root / "export", check_size=check_size, check_batch=1)
    return name, model, result


def test_export_round_trip_key_for_key(exported):
    name, model, result = exported
    kwargs, image_size, _ = ARCHS[name]
    saved = load_file(str(result.out_dir / "model.safetensors"))
    expected = model.online.backbone.state_dict()
    assert set(saved) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(saved[key], tensor), key
    # the call the issue documents: no missing or unexpected keys, every tensor as trained
    loaded = timm.create_model(name, pretrained=True, num_classes=0, **kwargs,
                               pretrained_cfg_overlay=dict(file=str(result.out_dir / "model.safetensors")))
    assert set(loaded.state_dict()) == set(saved)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
    assert result.max_abs_diff <= 1e-5
    cfg = json.loads((result.out_dir / "config.json").read_text())
    assert cfg["architecture"] == name and cfg["num_features"] == model.online.backbone.num_features
    assert cfg["model_args"] == kwargs and cfg["num_classes"] == 0
    assert cfg["pretrained_cfg"]["input_size"] == [3, image_size, image_size]
    assert cfg["pretrained_cfg"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert cfg["smog"]["step"] == 7 and cfg["smog"]["recipe"]["model"]["backbone"] == name
    assert set(cfg["smog"]["dropped"]) == {"online.projector", "predictor", "momentum.backbone", "momentum.projector"}
    assert not (result.out_dir / ".tmp-export").exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, SMoGModel]:
    root = tmp_path_factory.mktemp("tiny") / "run"
    return root, make_run(root, "test_resnet", image_size=32, steps=(1, 2))


def test_local_dir_load_and_eval_backbone(tiny_run, tmp_path):
    root, model = tiny_run
    export_timm(root, tmp_path)
    source = load_eval_backbone(tmp_path)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source.module(images), model.online.backbone(images))
    assert source.image_size == 32 and "step 2" in source.description
    untrained = load_eval_backbone(root, random_init=True)
    assert type(untrained.module) is type(source.module) and "random init" in untrained.description
    assert not torch.equal(untrained.module.conv1[0].weight,
                           source.module.conv1[0].weight)


def test_momentum_export_and_newest_checkpoint(tiny_run, tmp_path):
    root, model = tiny_run
    (root / "checkpoints" / ".tmp-step_00000003").mkdir(exist_ok=True)  # an interrupted save is ignored
    code = runpy.run_path(str(TOOLS / "export_timm.py"))["main"]([str(root), str(tmp_path), "--which", "momentum"])
    assert code == 0
    saved = load_file(str(tmp_path / "model.safetensors"))
    for key, tensor in model.momentum.backbone.state_dict().items():
        assert torch.equal(saved[key], tensor), key
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["smog"]["step"] == 2 and cfg["smog"]["encoder"] == "momentum"
    assert "online.backbone" in cfg["smog"]["dropped"]


def test_checkpoint_directory_and_ddp_prefix(tmp_path):
    model = make_run(tmp_path / "run", "test_resnet", image_size=32, wrapper_prefix="module.")
    result = export_timm(tmp_path / "run" / "checkpoints" / "step_00000007", tmp_path / "out")
    saved = load_file(str(result.out_dir / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.online.backbone.state_dict().items())


def run_tool(argv: list[str], capsys) -> tuple[int, str]:
    code = runpy.run_path(str(TOOLS / "export_timm.py"))["main"](argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("model_section, expected", [
    ({"backbone": "resnet18"}, ["missing", "unexpected", "online.backbone.conv1.0.weight"]),
    ({"backbone_kwargs": {"channels": [32, 48, 48, 128]}}, ["shape mismatches", "layer4"]),
])
def test_another_architecture_fails_naming_file_and_keys(tiny_run, tmp_path, capsys, model_section, expected):
    root, _ = tiny_run
    recipe = resolve_checkpoint(root).recipe
    recipe["model"].update(model_section)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002").symlink_to(root / "checkpoints" / "step_00000002")
    (run / "config.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    code, err = run_tool([str(run), str(tmp_path / "out")], capsys)
    assert code == 2
    assert "model.safetensors does not fit" in err and all(word in err for word in expected), err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_missing_files_fail_naming_them(tiny_run, tmp_path, capsys):
    root, _ = tiny_run
    code, err = run_tool([str(tmp_path / "nowhere"), str(tmp_path / "out")], capsys)
    assert code == 2 and "nowhere" in err
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    code, err = run_tool([str(step), str(tmp_path / "out")], capsys)
    assert code == 2 and str(tmp_path / "run" / "config.yaml") in err
    (tmp_path / "run" / "config.yaml").write_text((root / "config.yaml").read_text())
    code, err = run_tool([str(tmp_path / "run"), str(tmp_path / "out")], capsys)
    assert code == 2 and str(step / "model.safetensors") in err and "missing" in err


def test_not_a_smog_checkpoint(tiny_run, tmp_path, capsys):
    root, _ = tiny_run
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text((root / "config.yaml").read_text())
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(step / "model.safetensors"))
    code, err = run_tool([str(tmp_path / "run"), str(tmp_path / "out")], capsys)
    assert code == 2 and "no 'online.backbone.*' keys" in err and "conv1" in err
