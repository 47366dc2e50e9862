"""The small 32-px digits set: split, layout, determinism, and images -> shards -> eval loader end to end."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smog_scale.data.shards import build_eval_loader
from smog_scale.data.synthetic.digits32 import class_names, main, split_indices, write_images


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.jpg")}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    assert main([str(root)]) == 0
    return root


def test_split_is_stratified_disjoint_and_seeded() -> None:
    targets = np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])  # scikit-learn's digits
    split = split_indices(targets, seed=0)
    assert (len(split["train"]), len(split["val"])) == (1437, 360)
    assert np.array_equal(np.union1d(split["train"], split["val"]), np.arange(len(targets)))
    assert np.intersect1d(split["train"], split["val"]).size == 0
    per_class = np.bincount(targets[split["val"]], minlength=10) / np.bincount(targets)
    assert np.all(np.abs(per_class - 0.2) < 0.01)
    assert np.array_equal(split_indices(targets, seed=0)["val"], split["val"])
    assert not np.array_equal(split_indices(targets, seed=1)["val"], split["val"])


def test_layout_counts_and_image_format(small: Path) -> None:
    for split, count in (("train", 1437), ("val", 360)):
        folders = sorted(p.name for p in (small / "images" / split).iterdir())
        assert folders == class_names()
        files = sorted((small / "images" / split).rglob("*.jpg"))
        assert len(files) == count
        for path in files[::97]:
            with Image.open(path) as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 32))
    train_ids = {p.stem.split("_")[1] for p in (small / "images" / "train").rglob("*.jpg")}
    val_ids = {p.stem.split("_")[1] for p in (small / "images" / "val").rglob("*.jpg")}
    assert not train_ids & val_ids, "a handwriting sample in both splits"


def test_same_seed_same_bytes_other_seed_other_images(small: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "same", seed=0)
    assert digests(tmp_path / "same") == digests(small / "images")
    write_images(tmp_path / "other", seed=1)
    assert set(digests(tmp_path / "other").values()).isdisjoint(digests(small / "images").values())


def test_shards_hold_every_image_with_its_folder_class(small: Path) -> None:
    for split, count in (("train", 1437), ("val", 360)):
        shards = small / "shards" / split
        assert (shards / "classes.txt").read_text().split() == class_names()
        batches = list(build_eval_loader(str(shards), image_size=32, batch_size=512, num_workers=0))
        keys = [key for _, _, batch_keys in batches for key in batch_keys]
        labels = [int(label) for _, batch_labels, _ in batches for label in batch_labels]
        assert len(keys) == count and batches[0][0].shape[1:] == (3, 32, 32)
        folder = {p.stem: p.parent.name for p in (small / "images" / split).rglob("*.jpg")}
        assert all(folder[Path(key).name] == class_names()[label] for key, label in zip(keys, labels))


def test_refuses_to_write_over_a_split(small: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(small)])
    assert exit_info.value.code == 2 and "exists" in capsys.readouterr().err
