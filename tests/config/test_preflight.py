"""Checks before any work: paths a recipe names, the run folder, trackers, and the resume allow-list."""

from __future__ import annotations

import dataclasses

import pytest

from smog_scale.config import preflight
from smog_scale.config.recipe_file import ConfigError
from smog_scale.config.schema import Config, Derived, MonitorConfig, RunConfig, flatten, resolved
from smog_scale.config.validation import load_config

DERIVED = Derived(world_size=2, batch_size_per_device=16, num_samples=640, steps_per_epoch=10,
                         total_steps=40, warmup_steps=10, scaled_lr=0.0375, cache_size_per_device=32768)


def tree(*overrides: str, derived: Derived = DERIVED, tmp_path=None) -> dict:
    """A resolved recipe tree (``resolved``) as a checkpoint's config.yaml holds it."""
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  train_shards: /x/s-{0..3}.tar\n")
    return resolved(load_config(path, list(overrides)), derived)


@pytest.mark.parametrize("override", [
    "model.backbone=resnet18", "model.proj_dim=64", "model.sync_bn=false", "grouping.num_groups=300",
    "grouping.tau=0.2", "grouping.beta_end=0.9", "grouping.regroup_every=100", "grouping.cache_features=online",
    "grouping.update=averaging", "grouping.beta_schedule=fixed", "grouping.reset_momentum=false",
    "grouping.min_rows_per_group=3", "model.objective=byol",
    "grouping.kmeans_iters=10", "optim.name=adamw", "optim.epochs=800", "optim.global_batch_size=2048",
    "optim.base_lr=0.2", "optim.weight_decay=1e-5", "optim.clip_grad_norm=1.0", "optim.warmup_epochs=5",
    "data.crops=[{size: 96, count: 2}]", "data.num_samples=1000", "run.seed=1",
])
def test_a_resume_refuses_what_changes_the_run(tmp_path, override):
    differ = preflight.resume_differences(tree(override, tmp_path=tmp_path), tree(tmp_path=tmp_path))
    assert [d.split(" ")[0] for d in differ] == [override.split("=")[0]]
    assert "(checkpoint " in differ[0] and ", now " in differ[0]


@pytest.mark.parametrize("override", [
    "run.output_dir=/elsewhere", "run.max_steps=7", "run.log_every=1", "run.save_every=5", "run.keep_last=1",
    "run.resume=/a/checkpoints/step_00000004", "run.trackers=[]", "run.max_nonfinite_steps=3",
    "run.mixed_precision=bf16", "data.train_shards=/local/s-{0..3}.tar", "data.num_workers=2",
    "data.shuffle_buffer=10", "data.open_attempts=5", "data.stall_timeout_s=60", "model.compile=true",
    "model.channels_last=false", "grouping.cache_size=4096", "grouping.kmeans_mode=sharded",
    "optim.grad_accum_steps=2", "monitor.image_size=96", "monitor.batch_size=64",
])
def test_a_resume_allows_what_does_not(tmp_path, override):
    assert preflight.resume_differences(tree(override, tmp_path=tmp_path), tree(tmp_path=tmp_path)) == []


def test_derived_values_other_than_world_size_and_per_device_batch_must_match(tmp_path):
    elastic = Derived(**{**DERIVED.__dict__, "world_size": 1, "batch_size_per_device": 32,
                                "cache_size_per_device": 65536})
    assert preflight.resume_differences(tree(derived=elastic, tmp_path=tmp_path), tree(tmp_path=tmp_path)) == []
    shorter = Derived(**{**DERIVED.__dict__, "steps_per_epoch": 9, "total_steps": 36})
    differ = preflight.resume_differences(tree(derived=shorter, tmp_path=tmp_path), tree(tmp_path=tmp_path))
    assert [d.split(" ")[0] for d in differ] == ["derived.steps_per_epoch", "derived.total_steps"]


def test_new_keys_are_refused_unless_listed_and_old_checkpoints_compare_to_defaults(tmp_path):
    """A key the schema gains later (e.g. grouping.update) must match by default; a checkpoint written
    before a key existed compares against that key's default."""
    saved, current = tree(tmp_path=tmp_path), tree(tmp_path=tmp_path)
    current["grouping"]["update"] = "adopt_latest"
    assert [d.split(" ")[0] for d in preflight.resume_differences(current, saved)] == ["grouping.update"]
    del saved["grouping"]["kmeans_iters"]  # as if the checkpoint predates the key
    current = tree(tmp_path=tmp_path)
    assert preflight.resume_differences(current, saved) == []
    current["grouping"]["kmeans_iters"] = 5
    assert [d.split(" ")[0] for d in preflight.resume_differences(current, saved)] == ["grouping.kmeans_iters"]


def test_the_allow_list_names_existing_keys_only(tmp_path):
    keys = flatten(tree(tmp_path=tmp_path))
    for allowed in preflight.MAY_CHANGE_ON_RESUME:
        assert any(k == allowed or k.startswith(f"{allowed}.") for k in keys), f"{allowed} is not a recipe key"


def test_monitor_shards_are_checked_when_the_monitor_is_on(tmp_path):
    shard = tmp_path / "s-0.tar"
    shard.write_bytes(b"")
    base = Config(run=RunConfig(output_dir=str(tmp_path / "run"), trackers=[]))
    on = {"knn_every_epochs": 1, "knn_train_shards": str(tmp_path / "gone-{0..1}.tar"), "knn_val_shards": str(shard)}
    with pytest.raises(ConfigError, match=r"monitor.knn_train_shards: 2 of 2 shards of .*gone-\{0..1\}.tar' cannot "
                                          r"be read: .*gone-0.tar does not exist.*monitor.knn_every_epochs=0"):
        preflight.check_paths(dataclasses.replace(base, monitor=MonitorConfig(**on)))
    off = dict(on, knn_every_epochs=0)
    preflight.check_paths(dataclasses.replace(base, monitor=MonitorConfig(**off)))


def test_output_dir_and_trackers(tmp_path):
    (tmp_path / "file").write_text("")
    for path, message in ((tmp_path / "file", "is a file, not a folder"),
                          (tmp_path / "file" / "run", "cannot create")):
        with pytest.raises(ConfigError, match=f"run.output_dir: .*{message}"):
            preflight.check_paths(Config(run=RunConfig(output_dir=str(path), trackers=[])))
    preflight.check_paths(Config(run=RunConfig(output_dir=str(tmp_path / "a" / "b"), trackers=[])))
    assert (tmp_path / "a" / "b").is_dir()
    pytest.importorskip("tensorboard")
    if "swanlab" not in {str(t) for t in preflight.get_available_trackers()}:
        with pytest.raises(ConfigError, match=r"run.trackers: swanlab not installed.*run.trackers=\[tensorboard\]"):
            preflight.check_paths(Config(run=RunConfig(output_dir=str(tmp_path), trackers=["tensorboard",
                                                                                                   "swanlab"])))
