"""Semi-supervised fine-tuning on the demo data: the subset (listing, balanced draw, SimCLR-style name lists,
copy), the tool end to end, resume equal to a straight run, bad input, the loss on fake CUDA in bf16, and two
processes through ``accelerate launch``."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from smog_scale.data.converter.make_shards import ConvertOptions, convert
from smog_scale.data.shards import read_manifest, shard_urls
from smog_scale.data.subset import balanced_subset, list_samples, subset_from_names, write_subset_shards
from smog_scale.data.synthetic.demo import write_demo
from smog_scale.eval import finetune as finetune_module
from smog_scale.eval.finetune import Classifier, batch_loss
from smog_scale.export.timm_export import export_timm
from smog_scale.models.backbone import build_backbone
from tests.helpers import ROOT, make_run

TOOL = ROOT / "tools" / "finetune.py"
TRAIN_PER_CLASS = 6  # the demo's 10 classes: 60 train images, 20 val images


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Demo images converted to train / val shards, and a tiny exported backbone (test_resnet, 32 px)."""

    root = tmp_path_factory.mktemp("finetune")
    write_demo(root / "images", train_per_class=TRAIN_PER_CLASS, val_per_class=2)
    for split in ("train", "val"):
        convert(root / "images" / split, root / split, ConvertOptions(samples_per_shard=10, prefix=split),
                progress=False)
    make_run(root / "run", "test_resnet", image_size=32)
    export_timm(root / "run", root / "export")
    return {"root": root, "train": root / "train", "val": root / "val", "export": root / "export"}


def shard_contents(folder: Path) -> dict[str, tuple[int, bytes]]:
    """key -> (label, JPEG bytes) of every sample, read by webdataset: the reference for the tar listing."""
    found = {}
    for url in shard_urls(str(folder)):
        for sample in wds.WebDataset(url, shardshuffle=False):
            found[sample["__key__"]] = (int(sample["cls"]), sample["jpg"])
    return found


def test_listing_matches_webdataset_and_draw_is_balanced_and_seeded(data):
    samples = list_samples(str(data["train"]), progress=False)
    reference = shard_contents(data["train"])
    assert {s.key: s.label for s in samples} == {k: v[0] for k, v in reference.items()}
    for s in samples[:5]:
        with open(s.shard, "rb") as f:
            f.seek(s.offset)
            assert f.read(s.size) == reference[s.key][1]
    classes = read_manifest(str(data["train"]))["classes"]
    draw = balanced_subset(samples, 0.5, classes, seed=0)
    assert Counter(s.label for s in draw) == {label: 3 for label in range(10)}
    assert [s.key for s in balanced_subset(list(reversed(samples)), 0.5, classes, seed=0)] == [s.key for s in draw]
    assert [s.key for s in balanced_subset(samples, 0.5, classes, seed=1)] != [s.key for s in draw]
    with pytest.raises(ValueError, match=r"--fraction 0.05 leaves class 0 'astronaut' \(6 training samples\) "
                                         r"without a sample; it needs --fraction >= 0.0833"):
        balanced_subset(samples, 0.05, classes, seed=0)
    with pytest.raises(ValueError, match="class 10 'extra' .0 training samples. without a sample"):
        balanced_subset(samples, 0.5, [*classes, "extra"], seed=0)


def test_names_as_simclr_lists_them(data, tmp_path):
    samples = list_samples(str(data["train"]), progress=False)
    key = samples[7].key  # e.g. "chelsea/chelsea_0001"
    names = [f"{key.rsplit('/', 1)[-1]}.JPEG", "", samples[20].key, "# a comment"]
    assert [s.key for s in subset_from_names(samples, names, "list")] == sorted([key, samples[20].key])
    with pytest.raises(ValueError, match=r"list: 2 of 3 names are not in the training shards: n0_1.JPEG, x/y"):
        subset_from_names(samples, [names[0], "n0_1.JPEG", "x/y"], "list")
    with pytest.raises(ValueError, match="is listed twice"):
        subset_from_names(samples, [names[0], key], "list")
    copied = write_subset_shards(samples[:25], tmp_path / "subset", ["c"] * 10, progress=False)
    assert copied["num_samples"] == 25 and sum(e["samples"] for e in copied["shards"]) == 25
    contents, reference = shard_contents(tmp_path / "subset"), shard_contents(data["train"])
    assert contents == {s.key: reference[s.key] for s in samples[:25]}
    first = (tmp_path / "subset" / "subset-000000.tar").stat().st_mtime_ns
    assert write_subset_shards(samples[:25], tmp_path / "subset", ["c"] * 10, progress=False) == copied
    assert (tmp_path / "subset" / "subset-000000.tar").stat().st_mtime_ns == first  # the same subset is kept


def run_tool(argv: list[str]) -> int:
    return runpy.run_path(str(TOOL))["main"](argv)


def args(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [str(data["export"]), "--train-shards", str(data["train"]), "--val-shards", str(data["val"]),
            "--epochs", "2", "--batch-size", "10", "--workers", "0", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def straight(data) -> Path:
    """The tool run straight through: --fraction 0.5 (3 images a class), 2 epochs of 3 steps."""
    out = data["root"] / "straight" / "result.json"
    assert run_tool(args(data, out, "--fraction", "0.5")) == 0
    return out


def test_tool_end_to_end(straight):
    record = json.loads(straight.read_text())
    assert 0 <= record["top1"] <= record["top5"] <= 100 and record["val_samples"] == 20
    assert record["subset"]["num_samples"] == 30 and record["steps_per_epoch"] == 3
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    keys = straight.with_suffix(".keys.txt").read_text().split()
    per_class = Counter(k.split("/")[0] for k in keys)  # the demo's keys are CLASS/CLASS_NNNN
    assert len(per_class) == 10 and set(per_class.values()) == {3}
    assert Path(record["checkpoint"]).is_file()


def checkpoint_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out.with_suffix(".work") / "checkpoint.pt", weights_only=True)["model"]


def test_interrupted_run_resumes_to_the_straight_result(data, straight, monkeypatch, capsys):
    out = data["root"] / "resumed" / "result.json"
    keys = straight.with_suffix(".keys.txt")  # the same subset, by its saved keys
    original = finetune_module.train_epoch

    def stop_at_second_epoch(*a, **kw):
        if a[5] == 1:
            raise KeyboardInterrupt
        return original(*a, **kw)

    monkeypatch.setattr(finetune_module, "train_epoch", stop_at_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_tool(args(data, out, "--subset", str(keys)))
    assert torch.load(out.with_suffix(".work") / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(finetune_module, "train_epoch", original)
    assert run_tool(args(data, out, "--subset", str(keys))) == 0
    printed = capsys.readouterr().out
    assert "resuming after epoch 1 of 2" in printed and "fine-tuned on 30 labelled images for 2 epochs: top-1" in printed
    expected, got = json.loads(straight.read_text()), json.loads(out.read_text())
    assert got["subset"]["sha256"] == expected["subset"]["sha256"]
    for field in ("top1", "top5", "history"):
        assert got[field] == expected[field], field
    straight_weights, resumed = checkpoint_weights(straight), checkpoint_weights(out)
    assert all(torch.equal(resumed[k], v) for k, v in straight_weights.items())


@pytest.mark.parametrize("extra, message", [
    (["--fraction", "0.05"], "--fraction 0.05 leaves class 0 'astronaut' (6 training samples) without a sample"),
    (["--subset", "NAMES"], "2 of 3 names are not in the training shards: nowhere_1.JPEG, n0_2"),
    (["--fraction", "0.5", "--lr", "0.1"], "checkpoint.pt was written with other settings (base_lr 0.05, now 0.1)"),
    (["--fraction", "0.3"], "checkpoint.pt fine-tunes another subset"),
])
def test_bad_input_exits_2_with_one_line(data, straight, tmp_path, capsys, extra, message):
    names = tmp_path / "names.txt"
    names.write_text("nowhere_1.JPEG\nchelsea_0001.JPEG\nn0_2\n")
    argv = args(data, straight, *[str(names) if e == "NAMES" else e for e in extra])
    before = straight.with_suffix(".keys.txt").read_text()
    assert run_tool(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "|" not in line]  # no bars
    assert len(err) == 1 and err[0].startswith("finetune: error: ") and message in err[0], err
    assert straight.with_suffix(".keys.txt").read_text() == before  # the earlier run's subset is untouched


def test_missing_shards_fail_before_any_work(data, tmp_path, capsys):
    argv = args(data, tmp_path / "r.json", "--fraction", "0.5")
    argv[argv.index("--val-shards") + 1] = str(tmp_path / "val-{000000..000001}.tar")
    assert run_tool(argv) == 2
    assert "2 of 2 shards of" in capsys.readouterr().err and not any(tmp_path.iterdir())
    with pytest.raises(SystemExit) as stop:
        run_tool(args(data, tmp_path / "r.json", "--fraction", "0"))
    assert stop.value.code == 2 and "0 is not in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_loss_on_fake_cuda(dtype):
    backbone = build_backbone("test_resnet")
    model = Classifier(backbone, backbone.num_features, 10).to(dtype)  # real CPU tensors become fake in the mode
    with FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True):
        device = torch.device("cuda")
        model.to(device)
        batch = {"crops": [torch.randint(0, 255, (1, 4, 3, 32, 32), dtype=torch.uint8)],
                 "cls": torch.randint(0, 10, (4,))}
        loss = batch_loss(model, batch, device)
        logits = model(torch.zeros(4, 3, 32, 32, device=device, dtype=dtype))
    assert loss.shape == () and loss.dtype == torch.float32 and loss.device.type == "cuda"
    assert logits.shape == (4, 10) and logits.dtype == dtype


@pytest.mark.slow
def test_two_processes_through_accelerate(data, tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "0", "--num_cpu_threads_per_process", "1", str(TOOL),
           *args(data, out, "--fraction", "0.5")]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["val_samples"] == 20 and record["steps_per_epoch"] == 3  # every val image once; 5 per process
    assert proc.stdout.count("fine-tuned on 30 labelled images") == 1  # the main process reports
