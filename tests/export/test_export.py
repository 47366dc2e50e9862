"""Export to timm (round trips key for key: R50, R18, R50x2, Swin-T), to torchvision and detectron2 (R50, R18;
R50x2's detectron2 names and widths), strict loading and clear errors on bad input."""

from __future__ import annotations

import json
import pickle
import runpy
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
import yaml
from safetensors.torch import load_file, save_file

from smog_scale.export.loading import load_eval_backbone, load_exported, resolve_checkpoint
from smog_scale.export.resnet_formats import FORMATS, FormatError, detectron2_key, resnet_layout, torchvision_resnet
from smog_scale.export.timm_export import export_timm
from smog_scale.models.backbone import build_backbone
from smog_scale.models.smog import SMoGModel
from tests.helpers import EPS32, TOOLS, make_run

ARCHS = {  # name: (backbone_kwargs, trained crop size, self-check size, export formats)
    "resnet50": ({}, 64, 64, FORMATS),
    "resnet18": ({}, 64, 64, FORMATS),
    "resnet50x2": ({}, 64, 32, ("timm",)),
    "swin_tiny_patch4_window7_224": ({"drop_path_rate": 0.1}, 224, 224, ("timm",)),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def exported(request, tmp_path_factory):
    """(architecture, its SMoGModel, the export result, the run folder) built once per module and architecture."""
    name = request.param
    kwargs, image_size, check_size, formats = ARCHS[name]
    root = tmp_path_factory.mktemp(name)
    model = make_run(root / "run", name, kwargs, image_size)
    result = export_timm(root / "run", root / "export", check_size=check_size, check_batch=1, formats=formats)
    return name, model, result, root / "run"


def test_export_round_trip_key_for_key(exported):
    name, model, result, _ = exported
    kwargs, image_size, _, _ = ARCHS[name]
    saved = load_file(str(result.out_dir / "model.safetensors"))
    expected = model.online.backbone.state_dict()
    assert set(saved) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(saved[key], tensor), key
    # the call the issue documents: no missing or unexpected keys, every tensor as trained
    loaded = timm.create_model(name, pretrained=True, num_classes=0, **kwargs,
                               pretrained_cfg_overlay={"file": str(result.out_dir / "model.safetensors")})
    assert set(loaded.state_dict()) == set(saved)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
    assert result.max_abs_diff["timm"] <= 1e-5
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


# --- torchvision and detectron2 (detection / segmentation transfer) ---

DETECTION = pytest.mark.parametrize("exported", ["resnet50", "resnet18"], indirect=True)


@DETECTION
def test_torchvision_export_loads_strictly_and_matches_timm(exported):
    name, model, result, _ = exported
    state = torch.load(result.out_dir / "torchvision.pth", weights_only=True)
    vision = getattr(torchvision.models, name)()
    missing, unexpected = vision.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []  # strict except fc
    vision.fc = torch.nn.Identity()
    vision.load_state_dict(state, strict=True)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        timm_export = load_exported(result.out_dir)
        expected = timm_export(images)  # the timm export's features
        # other kernels add in other orders: 4 x the float32 error of the timm export against its float64 run
        error = (expected.double() - timm_export.double()(images.double())).abs().max()
        atol = 4 * max(float(error), EPS32 * float(expected.abs().max()))
        torch.testing.assert_close(vision.eval()(images), expected, rtol=0, atol=atol)
        torch.testing.assert_close(expected, model.online.backbone(images), rtol=0, atol=atol)
    assert result.max_abs_diff["torchvision"] <= 1e-5


BN_ENTRIES = ("weight", "bias", "running_mean", "running_var")


def detectron2_resnet_shapes(depth: int, stem: int, res2_out: int, width_per_group: int,
                             num_groups: int = 1) -> dict[str, tuple[int, ...]]:
    """Every parameter and BN buffer detectron2 builds for ``MODEL.RESNETS`` with these values, by its naming.

    Written from detectron2/modeling/backbone/resnet.py (``build_resnet_backbone``), independently of
    smog_scale.export.resnet_formats: a ``BasicStem`` ``stem.conv1`` (7x7, 3 -> STEM_OUT_CHANNELS); stages ``res2``..``res5``
    of 18: 2,2,2,2 / 34, 50: 3,4,6,3 / 101: 3,4,23,3 / 152: 3,8,36,3 blocks named ``resS.i``; a
    ``BottleneckBlock`` has ``conv1`` 1x1 (in -> bottleneck), ``conv2`` 3x3 (grouped) and ``conv3`` 1x1
    (-> out), a ``BasicBlock`` (depth 18, 34) ``conv1`` and ``conv2`` 3x3; a block whose input and output
    widths differ has a ``shortcut`` 1x1 conv; every conv is bias-free with a ``.norm`` (BN: weight, bias,
    running_mean, running_var); bottleneck = NUM_GROUPS x WIDTH_PER_GROUP, and both it and the output
    width (RES2_OUT_CHANNELS at res2) double at every stage.
    """
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}[depth]
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, out: int, inputs: int, kernel: int) -> None:
        shapes[f"{name}.weight"] = (out, inputs, kernel, kernel)
        shapes.update({f"{name}.norm.{entry}": (out,) for entry in BN_ENTRIES})

    conv("stem.conv1", stem, 3, 7)
    inputs, out, bottleneck = stem, res2_out, num_groups * width_per_group
    for stage, count in enumerate(blocks, start=2):
        for i in range(count):
            block = f"res{stage}.{i}"
            if depth >= 50:
                conv(f"{block}.conv1", bottleneck, inputs, 1)
                conv(f"{block}.conv2", bottleneck, bottleneck // num_groups, 3)
                conv(f"{block}.conv3", out, bottleneck, 1)
            else:
                conv(f"{block}.conv1", out, inputs, 3)
                conv(f"{block}.conv2", out, out, 3)
            if inputs != out:
                conv(f"{block}.shortcut", out, inputs, 1)
            inputs = out
        out, bottleneck = 2 * out, 2 * bottleneck
    return shapes


def _resnets_section(config_file: Path) -> dict:
    return yaml.safe_load(config_file.read_text())["MODEL"]["RESNETS"]


@DETECTION
def test_detectron2_pickle_key_by_key_and_shape_by_shape(exported):
    name, model, result, _ = exported
    raw = (result.out_dir / "detectron2.pkl").read_bytes()
    assert b"numpy._core" not in raw and b"numpy.core" not in raw and b"torch" not in raw  # readable on NumPy 1.x
    stored = pickle.loads(raw, encoding="latin1")  # what DetectionCheckpointer does with a .pkl
    assert stored["matching_heuristics"] is True and stored["__author__"].startswith("smog_scale")
    weights = stored["model"]
    assert all(isinstance(v, np.ndarray) and v.flags.writeable for v in weights.values())
    cfg = yaml.safe_load((result.out_dir / "detectron2.yaml").read_text())
    resnets = cfg["MODEL"]["RESNETS"]
    assert resnets == {"DEPTH": 50, "STRIDE_IN_1X1": False, "STEM_OUT_CHANNELS": 64, "RES2_OUT_CHANNELS": 256,
                       "NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64} if name == "resnet50" else \
        {"DEPTH": 18, "STRIDE_IN_1X1": False, "STEM_OUT_CHANNELS": 64, "RES2_OUT_CHANNELS": 64, "NUM_GROUPS": 1,
         "WIDTH_PER_GROUP": 64}
    assert cfg["INPUT"]["FORMAT"] == "RGB" and cfg["MODEL"]["PIXEL_MEAN"] == [123.675, 116.28, 103.53]
    assert cfg["MODEL"]["WEIGHTS"] == str((result.out_dir / "detectron2.pkl").resolve())
    expected = detectron2_resnet_shapes(resnets["DEPTH"], resnets["STEM_OUT_CHANNELS"], resnets["RES2_OUT_CHANNELS"],
                                        resnets["WIDTH_PER_GROUP"], resnets["NUM_GROUPS"])
    assert {k: v.shape for k, v in weights.items()} == expected
    timm_state = model.online.backbone.state_dict()
    pairs = {"stem.conv1.weight": "conv1.weight", "stem.conv1.norm.running_var": "bn1.running_var",
             "res2.0.conv2.norm.bias": "layer1.0.bn2.bias", "res5.1.conv2.weight": "layer4.1.conv2.weight",
             "res3.0.shortcut.weight": "layer2.0.downsample.0.weight",
             "res4.0.shortcut.norm.running_mean": "layer3.0.downsample.1.running_mean"}
    for d2_name, timm_name in pairs.items():
        np.testing.assert_array_equal(weights[d2_name], timm_state[timm_name].numpy())
    assert len(weights) == sum(not k.endswith("num_batches_tracked") for k in timm_state)


def test_wide_resnet_detectron2_names_and_config_keys():
    """R50x2 (wider stages, 64-channel stem: timm builds a plain 7x7 stem at 64 whatever stem_width says)."""
    with torch.device("meta"):
        backbone = build_backbone("resnet50x2")
    layout = resnet_layout(backbone, "resnet50x2")
    assert (layout.depth, layout.stem_channels, layout.res2_out_channels, layout.width_per_group) == (50, 64, 512, 128)
    converted = {detectron2_key(k): tuple(v.shape) for k, v in backbone.state_dict().items()}
    converted.pop(None)
    assert converted == detectron2_resnet_shapes(50, 64, 512, 128)
    with pytest.raises(FormatError, match="resnet50x2: torchvision has no constructor of that name, and its ResNet "
                                          r"class cannot build this one \(it gives stage 1 256 output channels"):
        torchvision_resnet("resnet50x2", layout)


@pytest.mark.parametrize("exported, fmt, message", [
    ("swin_tiny_patch4_window7_224", "torchvision",
     "swin_tiny_patch4_window7_224: --format torchvision and detectron2 take ResNets with torchvision's layout"),
    ("swin_tiny_patch4_window7_224", "detectron2", "(SwinTransformer is not a ResNet)"),
], indirect=["exported"])
def test_format_the_backbone_cannot_take_fails_with_one_line(exported, tmp_path, capsys, fmt, message):
    _, _, _, run = exported
    code, err = run_tool([str(run), str(tmp_path / "out"), "--format", "timm", fmt], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written


def test_resnet_d_fails_naming_the_module(tiny_run, tmp_path, capsys):
    root, _ = tiny_run  # test_resnet: deep stem and ResNet-D's average-pool shortcut
    code, err = run_tool([str(root), str(tmp_path / "out"), "--format", "detectron2"], capsys)
    assert code == 2 and "(module 'layer2.0.downsample.0': AvgPool2d)" in err, err
