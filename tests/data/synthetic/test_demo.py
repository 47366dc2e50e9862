"""The built-in demo data set: layout, sizes, determinism, held-out split, and conversion end to end."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from smog_scale.data.converter.make_shards import ConvertOptions, convert
from smog_scale.data.synthetic.demo import SIDE_RANGE, class_names, main, write_demo


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_demo(root, train_per_class=4, val_per_class=2, seed=0)
    return root


def test_writes_labelled_train_and_val_folders(demo: Path) -> None:
    classes = class_names()
    assert len(classes) == 10 and classes == sorted(classes)
    for split, per_class in [("train", 4), ("val", 2)]:
        assert sorted(p.name for p in (demo / split).iterdir()) == classes
        for name in classes:
            files = sorted((demo / split / name).iterdir())
            assert len(files) == per_class
            for path in files:
                with Image.open(path) as image:
                    assert (image.format, image.mode) == ("JPEG", "RGB")
                    assert SIDE_RANGE[0] <= max(image.size) <= SIDE_RANGE[1] and min(image.size) >= 100
    # varied, not copies: no two images of a class are the same file
    assert len(set(digests(demo).values())) == 10 * (4 + 2)


def test_same_seed_same_bytes_other_seed_other_images(demo: Path, tmp_path: Path) -> None:
    write_demo(tmp_path / "same", train_per_class=4, val_per_class=2, seed=0)
    write_demo(tmp_path / "other", train_per_class=4, val_per_class=2, seed=1)
    assert digests(tmp_path / "same") == digests(demo)
    assert set(digests(tmp_path / "other").values()).isdisjoint(digests(demo).values())


def test_refuses_to_write_over_a_split(demo: Path) -> None:
    with pytest.raises(FileExistsError, match="train"):
        write_demo(demo, train_per_class=1, val_per_class=1)


def test_flat_val_converts_end_to_end_with_train_indices(tmp_path: Path) -> None:
    assert main([str(tmp_path), "--train-per-class", "2", "--val-per-class", "2", "--seed", "5", "--flat-val"]) == 0
    flat = sorted((tmp_path / "val").iterdir())
    assert len(flat) == 20 and all(p.is_file() and p.suffix == ".JPEG" for p in flat)
    with open(tmp_path / "LOC_val_solution.csv", newline="") as f:
        truth = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    assert sorted(truth) == [p.stem for p in flat]

    train = convert(tmp_path / "train", tmp_path / "train_shards", ConvertOptions(samples_per_shard=8), progress=False)
    val = convert(tmp_path / "val", tmp_path / "val_shards", ConvertOptions(samples_per_shard=8), progress=False)
    assert train["num_samples"] == 20 and val["num_samples"] == 20 and train["classes"] == val["classes"]
    assert train["skipped"] == val["skipped"] == 0
    urls = [str(tmp_path / "val_shards" / s["name"]) for s in val["shards"]]
    samples = wds.WebDataset(urls, shardshuffle=False).to_tuple("__key__", "cls")
    assert {key: val["classes"][int(cls)] for key, cls in samples} == truth
