"""Every recipe parses, validates and builds its model on the meta device (no memory)."""

from pathlib import Path

import pytest
import torch

from smog_scale import config
from smog_scale.models.smog import SMoGModel

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
# Backbone parameters (millions) the recipes must build: timm's counts; SimCLR widths ~94M / ~375M.
BACKBONE_MILLIONS = {"resnet50": 23.5, "resnet50x2": 93.9, "resnet50x4": 375.1,
                     "swin_tiny_patch4_window7_224": 27.5, "resnet18": 11.2}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_builds_on_meta_device(recipe):
    cfg = config.load(recipe)
    m = cfg.model
    with torch.device("meta"):
        model = SMoGModel(m.backbone, m.proj_hidden_dim, m.proj_dim, m.pred_hidden_dim, m.backbone_kwargs)
    backbone = sum(p.numel() for p in model.online.backbone.parameters()) / 1e6
    total = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{recipe.stem}: backbone {m.backbone} {backbone:.1f}M, all networks {total:.1f}M")
    assert backbone == pytest.approx(BACKBONE_MILLIONS[m.backbone], abs=0.1)
    world, samples = (1, 320) if recipe.stem == "demo_cpu" else (8, 1_281_167)  # demo set / ImageNet-1k
    derived = config.derive(cfg, world_size=world, num_samples=samples)
    assert derived.batch_size_per_device * world == cfg.optim.global_batch_size


def test_all_published_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"r50_400ep", "r50_800ep", "r50_mc_400ep", "r50x2", "r50x4", "swin_t", "swin_t_mc", "demo_cpu"} <= names
