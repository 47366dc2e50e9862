"""The ImageNet-to-shards converter: layouts, round trip, bad inputs, resume, determinism, CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smog_scale.data.converter import make_shards
from smog_scale.data.converter.make_shards import PROGRESS_DIR, ConvertOptions, convert, main, plan_shards
from smog_scale.data.converter.sources import ConversionError, InputImage, scan_source
from tests.helpers import ROOT as REPO

MANIFEST_KEYS = {"format", "tool_version", "shards", "num_samples", "classes", "options", "skipped", "report"}


def image_bytes(seed: int, size: tuple[int, int] = (20, 14), mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A small noise image, different for every seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def make_imagefolder(root: Path, per_class: dict[str, int]) -> dict[str, tuple[str, bytes]]:
    """Write ``root/<class>/img_<i>.JPEG``; return key -> (class, bytes) as the converter should key them."""
    expected = {}
    for c, (name, count) in enumerate(sorted(per_class.items())):
        (root / name).mkdir(parents=True)
        for i in range(count):
            data = image_bytes(1000 * c + i)
            (root / name / f"img_{i}.JPEG").write_bytes(data)
            expected[f"{name}/img_{i}"] = (name, data)
    return expected


def read_shards(out_dir: Path) -> dict[str, tuple[int, bytes, str]]:
    """key -> (cls, jpg bytes, shard name), read with plain tarfile; fails on a key seen twice."""
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    shard_of = {}
    for shard in sorted(out_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.rsplit(".", 1)
                assert ext not in members[key], f"{key}.{ext} is in more than one place"
                data = tar.extractfile(member)
                assert data is not None, member.name
                members[key][ext] = data.read()
                shard_of[key] = shard.name
    assert all(set(m) == {"cls", "jpg"} for m in members.values())
    return {k: (int(m["cls"]), m["jpg"], shard_of[k]) for k, m in members.items()}


def load_outputs(out_dir: Path) -> tuple[dict, dict]:
    return json.loads((out_dir / "manifest.json").read_text()), json.loads((out_dir / "report.json").read_text())


def check_accounting(out_dir: Path, num_inputs: int) -> dict[str, tuple[int, bytes, str]]:
    """Manifest, report, classes.txt and shards agree, and every input is accounted for."""
    manifest, report = load_outputs(out_dir)
    samples = read_shards(out_dir)
    assert set(manifest) == MANIFEST_KEYS and manifest["format"] == 1 and manifest["report"] == "report.json"
    assert (out_dir / "classes.txt").read_text().splitlines() == manifest["classes"]
    assert manifest["num_samples"] == len(samples) == sum(s["samples"] for s in manifest["shards"])
    assert sorted(s["name"] for s in manifest["shards"]) == sorted(p.name for p in out_dir.glob("*.tar"))
    for shard in manifest["shards"]:
        assert shard["samples"] == sum(name == shard["name"] for _, _, name in samples.values())
    assert manifest["skipped"] == len(report["skipped"])
    assert report["inputs"] == num_inputs == len(samples) + len(report["skipped"]) + len(report["ignored"])
    assert not list((out_dir / PROGRESS_DIR).glob("*.tmp"))
    return samples


def test_imagefolder_round_trip(tmp_path: Path) -> None:
    expected = make_imagefolder(tmp_path / "train", {"ant": 5, "bee": 4, "cat": 6})
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "bee" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "cat" / "broken.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "train" / "README").write_text("top-level file")
    (tmp_path / "train" / "stray.JPEG").write_bytes(image_bytes(99))
    manifest = convert(tmp_path / "train", tmp_path / "out", ConvertOptions(samples_per_shard=4), progress=False)

    samples = check_accounting(tmp_path / "out", num_inputs=len(expected) + 4)
    _, report = load_outputs(tmp_path / "out")
    assert manifest["classes"] == ["ant", "bee", "cat", "empty"]
    assert report["layout"] == "imagefolder" and report["empty_classes"] == ["empty"]
    assert sorted(Path(s["path"]).name for s in report["skipped"]) == ["broken.JPEG", "stray.JPEG"]
    assert sorted(Path(i["path"]).name for i in report["ignored"]) == ["README", "notes.txt"]
    assert samples.keys() == expected.keys()
    for key, (class_name, data) in expected.items():
        label, jpg, _ = samples[key]
        assert manifest["classes"][label] == class_name and jpg == data
    assert sorted(s["samples"] for s in manifest["shards"]) == [3, 4, 4, 4]  # 16 planned, one skipped
    assert any(len({samples[k][0] for k in samples if samples[k][2] == s["name"]}) > 1 for s in manifest["shards"])


def test_shards_read_back_with_webdataset(tmp_path: Path) -> None:
    import webdataset as wds

    expected = make_imagefolder(tmp_path / "train", {"a": 3, "b": 3})
    manifest = convert(tmp_path / "train", tmp_path / "out", ConvertOptions(samples_per_shard=4), progress=False)
    urls = [str(tmp_path / "out" / s["name"]) for s in manifest["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "cls")
    seen = {key: (image.size, label) for key, image, label in dataset}
    assert seen == {k: ((20, 14), manifest["classes"].index(c)) for k, (c, _) in expected.items()}


@pytest.mark.parametrize("form", ["loc_csv", "plain"])
def test_val_layout(tmp_path: Path, form: str) -> None:
    val = tmp_path / "val"
    val.mkdir()
    truth = {f"ILSVRC2012_val_{i:08d}": ["n02", "n01", "n03"][i % 3] for i in range(1, 8)}
    for i, stem in enumerate(truth):
        (val / f"{stem}.JPEG").write_bytes(image_bytes(i))
    (val / "ILSVRC2012_val_00000099.JPEG").write_bytes(image_bytes(99))  # no label: skipped
    labels = {**truth, "ILSVRC2012_val_00000100": "n04"}  # a label without an image: counted
    if form == "loc_csv":  # ImageNet's file sits beside the folder; the converter finds it there
        rows = [f"{stem},{name} 1 2 30 40 {name} 5 6 7 8" for stem, name in labels.items()]
        (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
        options = ConvertOptions(samples_per_shard=3)
    else:
        (tmp_path / "val.txt").write_text("".join(f"{stem}.JPEG {name}\n" for stem, name in labels.items()))
        options = ConvertOptions(samples_per_shard=3, labels=tmp_path / "val.txt")
    manifest = convert(val, tmp_path / "out", options, progress=False)

    samples = check_accounting(tmp_path / "out", num_inputs=8)
    _, report = load_outputs(tmp_path / "out")
    assert report["layout"] == "val" and report["labels_without_image"] == 1
    assert manifest["classes"] == ["n01", "n02", "n03", "n04"] and report["empty_classes"] == ["n04"]
    assert "no label" in report["skipped"][0]["reason"]
    assert {k: manifest["classes"][label] for k, (label, _, _) in samples.items()} == truth


def test_integer_labels_index_numerically(tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    labels = {f"v{i}": str(label) for i, label in enumerate([0, 2, 10, 11])}
    for i, stem in enumerate(labels):
        (tmp_path / "val" / f"{stem}.jpg").write_bytes(image_bytes(i))
    (tmp_path / "val.txt").write_text("".join(f"{stem}.jpg {label}\n" for stem, label in labels.items()))
    inventory = scan_source(tmp_path / "val", tmp_path / "val.txt")
    assert inventory.classes == ["0", "2", "10", "11"]


def make_archive(path: Path, per_class: dict[str, int]) -> dict[str, tuple[str, bytes]]:
    """The official training archive's form: an outer tar of ``<class>.tar`` files of JPEGs."""
    expected = {}
    with tarfile.open(path, "w") as outer:
        for c, (name, count) in enumerate(sorted(per_class.items())):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for i in range(count):
                    data = image_bytes(1000 * c + i)
                    add_member(inner, f"{name}_{i}.JPEG", data)
                    expected[f"{name}/{name}_{i}"] = (name, data)
                if name == "n02":
                    add_member(inner, "checksums.md5", b"not an image")
            add_member(outer, f"{name}.tar", inner_bytes.getvalue())
        add_member(outer, "README.txt", b"not a class tar")
    return expected


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_archive_layout_read_in_place(tmp_path: Path) -> None:
    expected = make_archive(tmp_path / "ILSVRC2012_img_train.tar", {"n01": 4, "n02": 3, "n03": 0})
    manifest = convert(
        tmp_path / "ILSVRC2012_img_train.tar", tmp_path / "out", ConvertOptions(samples_per_shard=3), progress=False
    )
    samples = check_accounting(tmp_path / "out", num_inputs=len(expected) + 2)
    _, report = load_outputs(tmp_path / "out")
    assert report["layout"] == "archive" and report["empty_classes"] == ["n03"]
    assert sorted(i["path"].rsplit("/", 1)[-1].rsplit(":", 1)[-1] for i in report["ignored"]) == [
        "README.txt",
        "checksums.md5",
    ]
    assert manifest["classes"] == ["n01", "n02", "n03"]
    assert {k: (manifest["classes"][label], jpg) for k, (label, jpg, _) in samples.items()} == expected
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and p.name != "out"]  # nothing extracted


def test_undetectable_layouts_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    for source in [tmp_path / "empty", tmp_path / "notes.txt", tmp_path / "missing"]:
        with pytest.raises(ConversionError, match=str(source)):
            scan_source(source)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.JPEG").write_bytes(image_bytes(0))
    with pytest.raises(ConversionError, match="needs a label file"):
        scan_source(tmp_path / "flat")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "empty"), str(tmp_path / "out")])
    assert exit_info.value.code == 2 and str(tmp_path / "empty") in capsys.readouterr().err


def bad_inputs() -> dict[str, bytes]:
    """File name -> bytes for each kind of damaged or unusual input ImageNet holds."""
    good = image_bytes(7, size=(64, 48))
    palette, rgba = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.arange(64 * 48, dtype=np.uint8).reshape(48, 64) % 16).convert("P").save(
        palette, "PNG", transparency=0
    )
    transparent_corner = Image.new("RGBA", (30, 20), (200, 10, 10, 255))
    transparent_corner.putpixel((0, 0), (0, 0, 0, 0))
    transparent_corner.save(rgba, "PNG")
    return {
        "good.JPEG": good,
        "truncated.JPEG": good[: len(good) // 2],
        "corrupt.JPEG": bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)),
        "empty.JPEG": b"",
        "cmyk.JPEG": image_bytes(1, mode="CMYK"),
        "gray.JPEG": image_bytes(2, mode="L"),
        "png_named_jpeg.JPEG": image_bytes(3, fmt="PNG"),
        "palette.png": palette.getvalue(),
        "rgba.png": rgba.getvalue(),
    }


def test_bad_inputs_are_skipped_or_become_rgb_jpeg(tmp_path: Path) -> None:
    (tmp_path / "src" / "c").mkdir(parents=True)
    inputs = bad_inputs()
    for name, data in inputs.items():
        (tmp_path / "src" / "c" / name).write_bytes(data)
    convert(tmp_path / "src", tmp_path / "out", ConvertOptions(samples_per_shard=4), progress=False)

    samples = check_accounting(tmp_path / "out", num_inputs=len(inputs))
    _, report = load_outputs(tmp_path / "out")
    assert sorted(Path(s["path"]).name for s in report["skipped"]) == ["corrupt.JPEG", "empty.JPEG", "truncated.JPEG"]
    assert "truncated" in next(s["reason"] for s in report["skipped"] if "truncated.JPEG" in s["path"])
    converted = {Path(c["path"]).name: c["from"] for c in report["converted"]}
    assert converted == {
        "cmyk.JPEG": "JPEG/CMYK",
        "gray.JPEG": "JPEG/L",
        "png_named_jpeg.JPEG": "PNG/RGB",
        "palette.png": "PNG/P",
        "rgba.png": "PNG/RGBA",
    }
    assert samples["c/good"][1] == inputs["good.JPEG"]  # an RGB JPEG keeps its bytes
    for key in ["c/cmyk", "c/gray", "c/png_named_jpeg", "c/palette", "c/rgba"]:
        image = Image.open(io.BytesIO(samples[key][1]))
        assert (image.format, image.mode) == ("JPEG", "RGB")
    rgba = Image.open(io.BytesIO(samples["c/rgba"][1]))
    assert rgba.size == (30, 20) and min(rgba.getpixel((0, 0))) > 200  # transparent -> white, not black


def test_max_side_resizes_only_larger_images(tmp_path: Path) -> None:
    (tmp_path / "src" / "c").mkdir(parents=True)
    (tmp_path / "src" / "c" / "big.JPEG").write_bytes(image_bytes(0, size=(80, 40)))
    (tmp_path / "src" / "c" / "small.JPEG").write_bytes(small := image_bytes(1, size=(20, 30)))
    (tmp_path / "src" / "c" / "big_gray.png").write_bytes(image_bytes(2, size=(30, 90), mode="L", fmt="PNG"))
    convert(tmp_path / "src", tmp_path / "out", ConvertOptions(max_side=32), progress=False)

    samples = check_accounting(tmp_path / "out", num_inputs=3)
    _, report = load_outputs(tmp_path / "out")
    sizes = {k: Image.open(io.BytesIO(jpg)).size for k, (_, jpg, _) in samples.items()}
    assert sizes == {"c/big": (32, 16), "c/small": (20, 30), "c/big_gray": (11, 32)}
    assert samples["c/small"][1] == small and report["resized"] == 2
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["options"]["max_side"] == 32


def test_deterministic_under_seed_and_worker_count(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "train", {"a": 6, "b": 6, "c": 6})
    runs = {
        "one": ConvertOptions(samples_per_shard=5, seed=3, workers=1),
        "two": ConvertOptions(samples_per_shard=5, seed=3, workers=2),
        "other_seed": ConvertOptions(samples_per_shard=5, seed=4, workers=1),
    }
    for name, options in runs.items():
        convert(tmp_path / "train", tmp_path / name, options, progress=False)

    def contents(name: str) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir()) if p.is_file()}

    assert contents("one") == contents("two")
    assert contents("one")["manifest.json"] != contents("other_seed")["manifest.json"]
    assert contents("one")["shard-000000.tar"] != contents("other_seed")["shard-000000.tar"]


class Killed(BaseException):
    """Stands in for the process dying: like SIGINT, no ``except Exception`` catches it."""


def test_resume_after_interruption_redoes_only_unfinished_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = make_imagefolder(tmp_path / "train", {"a": 7, "b": 7})
    options = ConvertOptions(samples_per_shard=3)
    calls: list[int] = []
    die_at = [8]  # in the middle of the third shard
    real_encode = make_shards.encode_jpeg

    def encode_then_die(data: bytes, max_side: int | None = None) -> make_shards.Encoded:
        calls.append(1)
        if len(calls) in die_at:
            raise Killed
        return real_encode(data, max_side)

    monkeypatch.setattr(make_shards, "encode_jpeg", encode_then_die)
    with pytest.raises(Killed):
        convert(tmp_path / "train", tmp_path / "out", options, progress=False)
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists() and (out / PROGRESS_DIR / "shard-000002.tar.tmp").exists()
    finished = {p.name: p.stat() for p in out.glob("*.tar")}
    assert sorted(finished) == ["shard-000000.tar", "shard-000001.tar"]

    calls.clear()
    die_at.clear()
    convert(tmp_path / "train", out, options, progress=False)
    assert len(calls) == len(expected) - 6  # the two finished shards were not redone
    for name, stat in finished.items():
        assert (out / name).stat().st_mtime_ns == stat.st_mtime_ns and (out / name).stat().st_ino == stat.st_ino
    assert check_accounting(out, num_inputs=len(expected)).keys() == expected.keys()


def test_resume_rewrites_a_missing_shard_identically(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "train", {"a": 4, "b": 4})
    out, options = tmp_path / "out", ConvertOptions(samples_per_shard=3)
    convert(tmp_path / "train", out, options, progress=False)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    (out / "shard-000001.tar").unlink()
    (out / PROGRESS_DIR / "shard-000002.tar.tmp").write_bytes(b"half a shard")
    convert(tmp_path / "train", out, options, progress=False)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    assert {n: b for n, (b, _) in after.items()} == {n: b for n, (b, _) in before.items()}
    assert after["shard-000000.tar"][1] == before["shard-000000.tar"][1]
    assert after["shard-000002.tar"][1] == before["shard-000002.tar"][1]
    check_accounting(out, num_inputs=8)


def test_output_of_another_conversion_is_refused(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "train", {"a": 3, "b": 3})
    convert(tmp_path / "train", tmp_path / "out", ConvertOptions(samples_per_shard=2, seed=0), progress=False)
    with pytest.raises(ConversionError, match="different conversion"):
        convert(tmp_path / "train", tmp_path / "out", ConvertOptions(samples_per_shard=2, seed=1), progress=False)


def test_class_list_aligns_val_with_train(tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    labels = {"x": "n02", "y": "n09", "z": "n01"}
    for i, stem in enumerate(labels):
        (tmp_path / "val" / f"{stem}.JPEG").write_bytes(image_bytes(i))
    (tmp_path / "val.txt").write_text("".join(f"{stem}.JPEG {name}\n" for stem, name in labels.items()))
    (tmp_path / "classes.txt").write_text("n00\nn01\nn02\n")
    options = ConvertOptions(labels=tmp_path / "val.txt", classes=tmp_path / "classes.txt")
    manifest = convert(tmp_path / "val", tmp_path / "out", options, progress=False)
    samples = check_accounting(tmp_path / "out", num_inputs=3)
    assert manifest["classes"] == ["n00", "n01", "n02"]
    assert {k: label for k, (label, _, _) in samples.items()} == {"x": 2, "z": 1}
    assert "not in the class list" in load_outputs(tmp_path / "out")[1]["skipped"][0]["reason"]


def test_shard_size_packs_by_input_bytes() -> None:
    images = [InputImage(f"k{i}", 0, f"p{i}", f"p{i}", 0, 300_000) for i in range(10)]
    shards = plan_shards(images, ConvertOptions(shard_size_mb=1.0))
    assert [len(s) for s in shards] == [3, 3, 3, 1]
    assert sorted(i.key for s in shards for i in s) == sorted(i.key for i in images)
    assert [len(s) for s in plan_shards(images, ConvertOptions(shard_size_mb=0.1))] == [1] * 10  # one too big


def test_tool_script_converts_with_worker_processes(tmp_path: Path) -> None:
    expected = make_imagefolder(tmp_path / "train", {"a": 3, "b": 3})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "tools" / "make_shards.py"), str(tmp_path / "train"), str(tmp_path / "out")]
    result = subprocess.run(
        [*command, "--samples-per-shard", "2", "--workers", "2", "--prefix", "train"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 6 samples" in result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert check_accounting(tmp_path / "out", num_inputs=6).keys() == expected.keys()


KILL_ON_SEVENTH_IMAGE = """
import os, signal, sys
from smog_scale.data.converter import make_shards
real_encode, calls = make_shards.encode_jpeg, []
def encode_or_die(data, max_side=None):
    calls.append(1)
    if len(calls) == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_encode(data, max_side)
make_shards.encode_jpeg = encode_or_die
sys.exit(make_shards.main(sys.argv[1:]))
"""


def test_resume_after_sigkill(tmp_path: Path) -> None:
    expected = make_imagefolder(tmp_path / "train", {"a": 5, "b": 5})
    argv = [str(tmp_path / "train"), str(tmp_path / "out"), "--samples-per-shard", "3", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", KILL_ON_SEVENTH_IMAGE, *argv], env=env, timeout=120)
    assert killed.returncode == -9
    finished = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tar")}
    assert sorted(finished) == ["shard-000000.tar", "shard-000001.tar"]
    assert main(argv) == 0
    assert {n: (tmp_path / "out" / n).stat().st_mtime_ns for n in finished} == finished
    assert check_accounting(tmp_path / "out", num_inputs=len(expected)).keys() == expected.keys()


def test_output_inside_the_source_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_imagefolder(tmp_path / "train", {"a": 2, "b": 2})
    for out in [tmp_path / "train" / "shards", tmp_path / "train", tmp_path / "train" / "a" / "deep" / ".." / "x"]:
        with pytest.raises(ConversionError, match="is inside the source folder"):
            convert(tmp_path / "train", out, ConvertOptions(), progress=False)
        assert not out.exists() or out == tmp_path / "train"
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "train"), str(tmp_path / "train" / "shards")])
    assert exit_info.value.code == 2 and "is inside the source folder" in capsys.readouterr().err
    convert(tmp_path / "train", tmp_path / "train-shards", ConvertOptions(), progress=False)  # a sibling is fine


KILL_ON_ONE_INPUT = """
import os, signal, sys
from smog_scale.data.converter import make_shards
target, real_encode = open(os.environ["KILL_ON"], "rb").read(), make_shards.encode_jpeg
def encode_or_die(data, max_side=None):
    if data == target:  # in a worker process: as the out-of-memory killer does
        os.kill(os.getpid(), signal.SIGKILL)
    return real_encode(data, max_side)
make_shards.encode_jpeg = encode_or_die
sys.exit(make_shards.main(sys.argv[1:]))
"""


def test_a_killed_worker_ends_the_run_naming_its_input_then_resume_works(tmp_path: Path) -> None:
    """A multiprocessing.Pool waits forever for a SIGKILLed worker's shard; the converter now ends
    with one line naming the input, keeps the complete shards, and a rerun finishes the job."""
    expected = make_imagefolder(tmp_path / "train", {"a": 6, "b": 6})
    victim = tmp_path / "train" / "b" / "img_4.JPEG"
    argv = [str(tmp_path / "train"), str(tmp_path / "out"), "--samples-per-shard", "2", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "KILL_ON": str(victim)}
    killed = subprocess.run([sys.executable, "-c", KILL_ON_ONE_INPUT, *argv], env=env, capture_output=True, text=True,
                            timeout=120)
    lines = killed.stderr.strip().splitlines()
    assert killed.returncode == 1 and len(lines) == 1, killed.stderr[-3000:]
    assert lines[0].startswith("smog-make-shards: error: a converter worker process died abruptly (killed: out of "
                               f"memory?) while converting {victim} (for shard-0000"), lines[0]
    assert "rerun the same command to resume" in lines[0]
    assert not (tmp_path / "out" / "manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tar")}
    assert main(argv) == 0
    assert all((tmp_path / "out" / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    assert check_accounting(tmp_path / "out", num_inputs=len(expected)).keys() == expected.keys()
