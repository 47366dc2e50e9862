"""Every recipe parses, validates and builds its model on the meta device (no memory); the ablation recipes
are the rows of the paper's Table 7."""

import re
from pathlib import Path

import pytest
import torch

from smog_scale.config.derived import derive
from smog_scale.config.recipe_file import ConfigError
from smog_scale.config.schema import flatten, to_dict
from smog_scale.config.validation import load_config
from smog_scale.models.smog import SMoGModel
from tests.helpers import ROOT

RECIPE_DIR = ROOT / "recipes"
RECIPES = sorted(RECIPE_DIR.rglob("*.yaml"))
# Backbone parameters (millions) the recipes must build: timm's counts; SimCLR widths ~94M / ~375M.
BACKBONE_MILLIONS = {"resnet50": 23.5, "resnet50x2": 93.9, "resnet50x4": 375.1,
                     "swin_tiny_patch4_window7_224": 27.5, "resnet18": 11.2}


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(RECIPE_DIR).with_suffix("")) for p in RECIPES])
def test_recipe_builds_on_meta_device(recipe):
    cfg = load_config(recipe)
    m = cfg.model
    with torch.device("meta"):
        model = SMoGModel(m.backbone, m.proj_hidden_dim, m.proj_dim, m.pred_hidden_dim, m.backbone_kwargs)
    backbone = sum(p.numel() for p in model.online.backbone.parameters()) / 1e6
    total = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{recipe.stem}: backbone {m.backbone} {backbone:.1f}M, all networks {total:.1f}M")
    assert backbone == pytest.approx(BACKBONE_MILLIONS[m.backbone], abs=0.1)
    world, samples = (1, 320) if recipe.stem == "demo_cpu" else (8, 1_281_167)  # demo set / ImageNet-1k
    derived = derive(cfg, world_size=world, num_samples=samples)
    assert derived.batch_size_per_device * world == cfg.optim.global_batch_size


def test_all_published_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"r50_400ep", "r50_800ep", "r50_mc_400ep", "r50x2", "r50x4", "swin_t", "swin_t_mc", "demo_cpu",
            "byol_r50_400ep"} <= names


ABLATION_BASE = RECIPE_DIR / "ablations" / "base_r50_100ep.yaml"
# Table 7's rows: the keys each changes from the shared row (67.2) and the paper's top-1 its header states.
TABLE_7 = {
    "7a_beta_fixed_099": ({"grouping.beta_schedule": "fixed"}, 65.9),  # beta_end stays 0.99
    "7a_beta_linear_09": ({"grouping.beta_end": 0.9}, 67.0),
    "7a_beta_linear_0999": ({"grouping.beta_end": 0.999}, 67.1),
    "7b_none": ({"grouping.regroup_every": 0, "grouping.reset_momentum": False}, 0.1),
    "7b_clustering_only": ({"grouping.reset_momentum": False}, 53.7),
    "7b_reset_only": ({"grouping.regroup_every": 0, "grouping.reset_every": 300}, 42.1),
    "7c_k300": ({"grouping.num_groups": 300}, 65.2),
    "7c_k1000": ({"grouping.num_groups": 1000}, 67.0),
    "7c_k10000": ({"grouping.num_groups": 10000}, 67.2),
    "7d_random_select": ({"grouping.update": "random_select"}, 53.4),
    "7d_adopt_latest": ({"grouping.update": "adopt_latest"}, 30.2),
    "7d_averaging": ({"grouping.update": "averaging"}, 65.8),
}


def differences(recipe: Path, base: Path) -> dict:
    """The resolved keys whose values differ from ``base``'s (the run folder aside)."""
    mine, theirs = (flatten(to_dict(load_config(p))) for p in (recipe, base))
    return {k: v for k, v in mine.items() if v != theirs[k] and k != "run.output_dir"}


def test_ablation_rows_differ_from_the_shared_row_only_in_their_keys():
    rows = sorted(p.stem for p in (RECIPE_DIR / "ablations").glob("*.yaml") if p != ABLATION_BASE)
    assert rows == sorted(TABLE_7)
    for name, (changed, top1) in TABLE_7.items():
        recipe = RECIPE_DIR / "ablations" / f"{name}.yaml"
        assert differences(recipe, ABLATION_BASE) == changed, name
        assert re.search(rf"Table 7{name[1]}\b.*Paper: {top1} top-1", recipe.read_text(), re.DOTALL), name
    base = differences(ABLATION_BASE, RECIPE_DIR / "r50_400ep.yaml")
    assert base == {"optim.epochs": 100} and "Paper: 67.2 top-1" in ABLATION_BASE.read_text()


def test_recipe_base_is_laid_under_the_recipe(tmp_path):
    (tmp_path / "a.yaml").write_text("data: {train_shards: x}\ngrouping: {tau: 0.2, num_groups: 7}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ngrouping: {num_groups: 9}\n")
    cfg = load_config(tmp_path / "b.yaml", ["grouping.tau=0.3"])
    assert (cfg.data.train_shards, cfg.grouping.num_groups, cfg.grouping.tau) == ("x", 9, 0.3)
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="base must name another recipe"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml' does not exist"):
        load_config(tmp_path / "d.yaml")
