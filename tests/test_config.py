import pytest

from smog_scale import config
from smog_scale.config import ConfigError


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  train_shards: /x/s-{0..3}.tar\noptim:\n  global_batch_size: 64\n")
    return path


def test_load_with_overrides_and_dump(recipe, tmp_path):
    cfg = config.load(recipe, ["optim.base_lr=0.5", "grouping.num_groups=10", "run.max_steps=3"])
    assert (cfg.optim.base_lr, cfg.grouping.num_groups, cfg.run.max_steps) == (0.5, 10, 3)
    derived = config.derive(cfg, world_size=2, num_samples=640)
    assert (derived.batch_size_per_device, derived.steps_per_epoch) == (32, 8)  # 10 batches -> 8 for 8 workers
    assert derived.scaled_lr == pytest.approx(0.5 * 64 / 256)
    config.dump(cfg, tmp_path / "out.yaml", derived)
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
])
def test_errors_name_the_key(recipe, override, message):
    with pytest.raises(ConfigError) as err:
        config.load(recipe, [override])
    assert message in str(err.value)


def test_missing_recipe_and_impossible_launches(recipe, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    cfg = config.load(recipe, ["grouping.num_groups=3000", "grouping.cache_size=1000"])
    with pytest.raises(ConfigError, match=r"num_groups=3000 exceeds.*1000 x 2 rank\(s\) = 2000"):
        config.derive(cfg, world_size=2, num_samples=10_000)
    with pytest.raises(ConfigError, match="global_batch_size=64 is not divisible by world size 3"):
        config.derive(config.load(recipe), world_size=3, num_samples=10_000)
    with pytest.raises(ConfigError, match="gives no whole step of optim.global_batch_size=64"):
        config.derive(config.load(recipe, ["grouping.num_groups=10"]), world_size=1, num_samples=10)
