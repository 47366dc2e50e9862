import pytest

from smog_scale.config.derived import derive
from smog_scale.config.recipe_file import ConfigError
from smog_scale.config.schema import dump
from smog_scale.config.validation import crop_specs, load_config


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  train_shards: /x/s-{0..3}.tar\noptim:\n  global_batch_size: 64\n")
    return path


def test_load_with_overrides_and_dump(recipe, tmp_path):
    cfg = load_config(recipe, ["optim.base_lr=0.5", "grouping.num_groups=10", "run.max_steps=3"])
    assert (cfg.optim.base_lr, cfg.grouping.num_groups, cfg.run.max_steps) == (0.5, 10, 3)
    derived = derive(cfg, world_size=2, num_samples=640)
    assert (derived.batch_size_per_device, derived.steps_per_epoch) == (32, 8)  # 10 batches -> 8 for 8 workers
    assert derived.scaled_lr == pytest.approx(0.5 * 64 / 256)
    dump(cfg, tmp_path / "out.yaml", derived)
    assert "derived:" in (tmp_path / "out.yaml").read_text()


@pytest.mark.parametrize("override, message", [
    ("optim.base_lrr=1", "unknown key 'optim.base_lrr'; did you mean optim.base_lr?"),
    ("optimm.base_lr=1", "did you mean optim?"),
    ("optim.epochs=abc", "optim.epochs: expected int, got 'abc'"),
    ("optim.epochs=true", "optim.epochs: expected int"),
    ("grouping.kmeans_mode=foo", "grouping.kmeans_mode: 'foo' is not one of"),
    ("grouping.tau=-1", "grouping.tau must be positive"),
    ("data.open_attempts=0", "data.open_attempts must be at least 1"),
    ("data.stall_timeout_s=0", "data.stall_timeout_s must be positive"),
    ("data.crops=[{size: 96, count: 1, scal: [0.1, 0.2]}, {size: 96}]", "unknown key 'data.crops[0].scal'; did you mean scale?"),
    ("data.crops=[{size: 96, count: 1}]", "the first crop size must have at least 2 views"),
    ("optim", "not of the form dotted.key=value"),
    # Values that were accepted and broke later (ZeroDivisionError after step 1, every sample failing...).
    ("run.log_every=0", "run.log_every must be at least 1"),
    ("run.save_every=0", "run.save_every must be at least 1"),
    ("run.max_nonfinite_steps=0", "run.max_nonfinite_steps must be at least 1"),
    ("run.seed=-1", "run.seed must not be negative"),
    ("run.trackers=[tensorbord]", "run.trackers: ['tensorbord'] names an unknown tracker; Accelerate's are"),
    ("optim.base_lr=-0.1", "optim.base_lr must not be negative"),
    ("optim.final_lr=-1e-6", "optim.final_lr must not be negative"),
    ("optim.momentum=1", "optim.momentum must lie in [0, 1)"),
    ("optim.momentum=-0.5", "optim.momentum must lie in [0, 1)"),
    ("optim.betas=[0.9]", "optim.betas must be 2 values in [0, 1)"),
    ("optim.betas=[0.9, 1.0]", "optim.betas must be 2 values in [0, 1)"),
    ("optim.clip_grad_norm=0", "optim.clip_grad_norm must be positive"),
    ("data.crops=[{size: 224.0, count: 2}]", "data.crops[0].size: expected int, got 224.0 (float)"),
    ("data.crops=[{size: 0, count: 2}]", "data.crops[0]: invalid CropSpec"),
    ("data.crops=[{size: 32, count: 2, scale: [0.5]}]", "data.crops[0].scale: expected 2 values, got [0.5]"),
    ("data.crops=[{size: 32, count: 2, scale: [0.2, 0.5, 0.9]}]", "data.crops[0].scale: expected 2 values"),
    ("data.crops=[{size: 32, count: 2, scale: [0.9, 0.5]}]", "scale must satisfy 0 < lo <= hi <= 1"),
    ("data.crops=[{size: 32, count: 2, scale: [0, 0.5]}]", "scale must satisfy 0 < lo <= hi <= 1"),
    ("data.crops=[{size: 32, count: 2, scale: [0.5, 1.5]}]", "scale must satisfy 0 < lo <= hi <= 1"),
    ("optim.epochs=[1", "override 'optim.epochs=[1': invalid YAML"),
    # The ablation switches (docs/method.md "Ablations").
    ("grouping.update=mean", "grouping.update: 'mean' is not one of 'momentum', 'adopt_latest', 'averaging'"),
    ("grouping.beta_schedule=cosine", "grouping.beta_schedule: 'cosine' is not one of 'linear', 'fixed'"),
    ("grouping.regroup_every=-1", "grouping.regroup_every must not be negative (0: never re-group)"),
    ("grouping.reset_every=0", "grouping.reset_every must be positive"),
    ("grouping.reset_every=10 grouping.reset_momentum=false", "grouping.reset_every needs grouping.reset_momentum=true"),
    ("grouping.regroup_every=0", "grouping.reset_momentum=true with grouping.regroup_every=0 needs grouping.reset_every"),
    # The instance warm-up (docs/method.md "Instance warm-up").
    ("grouping.instance_warmup_steps=-1", "grouping.instance_warmup_steps must not be negative"),
    ("grouping.instance_tau=0", "grouping.instance_tau must be positive"),
    ("grouping.instance_warmup_steps=5 data.crops=[{size: 32, count: 3}]", "takes exactly 2 global views"),
])
def test_errors_name_the_key(recipe, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(recipe, override.split(" ", 1) if override.startswith(("grouping.reset", "grouping.instance")) else [override])
    assert message in str(err.value)


def test_float_forms_people_type_are_floats(recipe, tmp_path):
    """YAML 1.1 reads 5e-4 (no dot) as a string; on the command line, in a recipe, in crop records too."""
    cfg = load_config(recipe, ["optim.weight_decay=5e-4", "optim.final_lr=1e-6", "optim.base_lr=3E-4",
                               "data.crops=[{size: 32, count: 2, blur_sigma: [1e-1, 2e0]}]"])
    assert (cfg.optim.weight_decay, cfg.optim.final_lr, cfg.optim.base_lr) == (5e-4, 1e-6, 3e-4)
    assert crop_specs(cfg)[0].blur_sigma == (0.1, 2.0)
    written = tmp_path / "exp.yaml"
    written.write_text(recipe.read_text() + "  weight_decay: 5e-4\n  clip_grad_norm: -2.5E+1\n")
    with pytest.raises(ConfigError, match="optim.clip_grad_norm must be positive"):  # parsed as -25.0
        load_config(written)
    assert load_config(written, ["optim.clip_grad_norm=1e1"]).optim.weight_decay == 5e-4
    assert load_config(recipe, ["run.output_dir=1e5x"]).run.output_dir == "1e5x"  # not a number: a string


def test_yaml_syntax_error_is_one_line_naming_the_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim:\n  epochs: [1, 2\n  base_lr: 0.3\n")
    with pytest.raises(ConfigError) as err:
        load_config(broken)
    message = str(err.value)
    assert message.startswith(f"recipe '{broken}': invalid YAML at line 3, column 10: ") and "\n" not in message


def test_missing_recipe_and_impossible_launches(recipe, tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist; recipes: recipes/byol_r50_400ep.yaml, recipes/demo_cpu.yaml, recipes/r50_400ep.yaml"):
        load_config(tmp_path / "nope.yaml")
    cfg = load_config(recipe, ["grouping.num_groups=3000", "grouping.cache_size=1000", "optim.global_batch_size=48"])
    with pytest.raises(ConfigError, match=r"num_groups=3000 exceeds the feature cache: grouping.cache_size=1000 "
                                          r"leaves each of 3 rank\(s\) 333 rows \(999 in all\), below K / world size = 1000"):
        derive(cfg, world_size=3, num_samples=10_000)
    fits = load_config(recipe, ["grouping.num_groups=999", "grouping.cache_size=1000", "optim.global_batch_size=48"])
    assert derive(fits, world_size=3, num_samples=10_000).cache_size_per_device == 333  # equal shares, rounded down
    with pytest.raises(ConfigError, match="global_batch_size=64 is not divisible by world size 3"):
        derive(load_config(recipe), world_size=3, num_samples=10_000)
    with pytest.raises(ConfigError, match=r"instance_warmup_steps=304 leaves no SMoG step of the run's 304 \(152 per "
                                          r"epoch x optim.epochs=2\)"):
        derive(load_config(recipe, ["grouping.instance_warmup_steps=304", "optim.epochs=2"]), 1, num_samples=10_000)
    assert derive(load_config(recipe, ["grouping.instance_warmup_steps=303", "optim.epochs=2"]), 1, 10_000).total_steps == 304
    byol = ["grouping.instance_warmup_steps=304", "optim.epochs=2", "model.objective=byol"]  # its control: unused
    assert derive(load_config(recipe, byol), 1, 10_000).total_steps == 304
    with pytest.raises(ConfigError, match="gives no whole step of optim.global_batch_size=64"):
        derive(load_config(recipe, ["grouping.num_groups=10"]), world_size=1, num_samples=10)


def test_the_four_rows_of_table_7b_are_expressible(recipe):
    """None, periodic clustering, clustering + reset (the default), reset alone."""
    rows = {"none": ["grouping.regroup_every=0", "grouping.reset_momentum=false"],
            "clustering": ["grouping.reset_momentum=false"], "clustering_reset": [],
            "reset": ["grouping.regroup_every=0", "grouping.reset_every=300"]}
    loaded = {name: load_config(recipe, overrides).grouping for name, overrides in rows.items()}
    assert [(g.regroup_every, g.reset_momentum, g.reset_every) for g in loaded.values()] == [
        (0, False, None), (300, False, None), (300, True, None), (0, True, 300)]
