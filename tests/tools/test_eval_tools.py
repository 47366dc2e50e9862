"""The evaluation tools end to end on tiny shards: knn_eval, linear_eval, group_quality and plot_metrics."""

from __future__ import annotations

import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from accelerate import Accelerator
from PIL import Image

from smog_scale.data.shards import build_eval_loader
from smog_scale.eval.features import extract_features
from smog_scale.export.timm_export import export_timm
from tests.helpers import TOOLS, make_run


def test_plot_metrics_tool(tmp_path, capsys):
    lines = [{"message": "resumed"}]
    for step in range(10, 60, 10):
        lines.append({"step": step, "loss": 8 - step / 10, "lr": 0.1 * step, "groups_used": step, "beta": 1.0,
                      "assignment_entropy": 3.0, "largest_group_share": 0.1, "images_per_s": 100.0,
                      "label_agreement": step / 100, "prediction_hit_rate": step / 200})
        if step in (30, 50):
            lines.append({"step": step, "event": "regroup", "regroup/empty_reseeded": 0, "regroup/label_churn": 0.5})
    text = "\n".join(json.dumps(line) for line in lines) + '\n{"step": 60, "lo'  # a run still writing
    (tmp_path / "metrics.jsonl").write_text(text)
    main = runpy.run_path(str(TOOLS / "plot_metrics.py"))["main"]
    assert main([str(tmp_path), str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert ("loss, lr, groups_used, assignment_entropy, largest_group_share, label_agreement, prediction_hit_rate, "
            "images_per_s, regroup/label_churn)") in capsys.readouterr().out
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "x.png")]) == 2
    assert "nowhere/metrics.jsonl: no such file" in capsys.readouterr().err


def labelled_shards(root: Path, name: str, per_class: int, num_shards: int = 2, seed: int = 0) -> str:
    """Shards of 40 x 48 JPEGs of three classes told apart by colour, with the converter's manifest."""
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    samples = [(c, i) for c in range(3) for i in range(per_class)]
    entries = []
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        mine = samples[shard::num_shards]
        with wds.TarWriter(str(root / f"{name}-{shard:06d}.tar")) as sink:
            for c, i in mine:
                pixels = np.clip(colours[c] + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, "JPEG")
                sink.write({"__key__": f"{c}_{i:04d}", "jpg": buffer.getvalue(), "cls": c})
        entries.append({"name": f"{name}-{shard:06d}.tar", "samples": len(mine)})
    manifest = {"format": 1, "shards": entries, "num_samples": len(samples), "classes": ["r", "g", "b"]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root / f"{name}-{{000000..{num_shards - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny run (test_resnet, 32 px), its export, and labelled train / val shards."""

    root = tmp_path_factory.mktemp("eval")
    make_run(root / "run", "test_resnet", image_size=32)
    export_timm(root / "run", root / "export")
    return root, labelled_shards(root / "train", "train", 12), labelled_shards(root / "val", "val", 4, seed=1)


def run_tool(name: str, argv: list[str]) -> int:
    return runpy.run_path(str(TOOLS / name))["main"](argv)


def test_knn_tool_on_export_and_random_init(tiny, capsys):
    root, train, val = tiny
    common = ["--train-shards", train, "--val-shards", val, "--workers", "0", "--batch-size", "8"]
    assert run_tool("knn_eval.py", [str(root / "export"), *common, "--out", str(root / "knn.json")]) == 0
    assert run_tool("knn_eval.py", [str(root / "run"), *common, "--random-init"]) == 0
    out = capsys.readouterr().out
    assert "test_resnet from export" in out and "test_resnet random init" in out
    record = json.loads((root / "knn.json").read_text())
    assert 0 <= record["knn_top1"] <= record["knn_top5"] == 100.0  # 3 classes: top-5 holds them all
    assert record["image_size"] == 32


def test_knn_tool_bn_batches_changes_only_the_statistics(tiny, capsys):
    """--random-init --bn-batches: the random weights of --random-init with BatchNorm statistics of the train
    shards; the kNN differs from the plain random init and the record says how many batches were used."""
    root, train, val = tiny
    common = ["--train-shards", train, "--val-shards", val, "--workers", "0", "--batch-size", "8", "--random-init"]
    out = ["--out", str(root / "bn.json")]
    assert run_tool("knn_eval.py", [str(root / "run"), *common, "--bn-batches", "2", *out]) == 0
    assert "random init, BatchNorm statistics of 2 train batches" in capsys.readouterr().out
    assert json.loads((root / "bn.json").read_text())["bn_batches"] == 2
    with pytest.raises(SystemExit):
        run_tool("knn_eval.py", [str(root / "run"), *common, "--bn-batches", "-1"])


@pytest.mark.parametrize("tool", ["knn_eval.py", "linear_eval.py"])
@pytest.mark.parametrize("mistyped", ["--train-shards", "--val-shards"])
def test_tools_check_every_shard_argument_before_any_work(tiny, capsys, caplog, tool, mistyped):
    """A mistyped shard path ends at once with one line naming it: no retries of a local file that does
    not exist, no loader traceback, and no train features extracted before the val shards are found."""
    root, train, val = tiny
    shards = {"--train-shards": train, "--val-shards": val, mistyped: str(root / "val" / "vall-000000.tar")}
    code = run_tool(tool, [str(root / "export"), *(x for item in shards.items() for x in item), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [err.strip()], err
    assert err.startswith(f"{tool[:-3]}: error: 1 of 1 shards of '{root}/val/vall-000000.tar' cannot be read: ")
    assert "does not exist" in err and "num_samples" not in err and "features" not in err
    assert not [r for r in caplog.records if "attempt" in r.getMessage()]  # no retry of a local path


def test_tools_name_a_folder_without_manifest_without_advising_a_flag(tiny, tmp_path, capsys):
    root, train, _ = tiny
    code = run_tool("knn_eval.py", [str(root / "export"), "--train-shards", train, "--val-shards", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"knn_eval: error: no manifest.json at {tmp_path}/manifest.json (the " \
                                        "converter, tools/make_shards.py, writes one)", err


def test_tool_ends_with_one_line_when_a_worker_cannot_open_a_shard(tiny):
    """A pipe: shard that fails only shows in a loader worker: the tool prints the error on one line and
    exits; its workers (which ignore SIGTERM) are shut down with the error, so the exit does not hang."""
    root, _, val = tiny
    failing = "pipe:echo no such bucket >&2; exit 3"
    command = [sys.executable, str(TOOLS / "knn_eval.py"), str(root / "export"), "--train-shards", failing,
               "--val-shards", val, "--workers", "2"]
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(TOOLS.parent)}, capture_output=True,
                          text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("knn_eval: error:")]
    assert done.returncode == 2 and errors == [f"knn_eval: error: cannot open shard '{failing}' after 3 attempts: "
                                               f"{errors[0].split('attempts: ')[-1]}"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_feature_extraction_shows_the_total_from_the_manifests(tiny, capsys):
    _, _, val = tiny  # 2 shards of 6 samples, one per worker: 2 batches of at most 5 each
    loader = build_eval_loader(val, image_size=8, batch_size=5, num_workers=2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    feats, _ = extract_features(model, loader, Accelerator(cpu=True), desc="val features")
    err = capsys.readouterr().err
    assert feats.shape == (12, 4) and "val features: 100%" in err and "| 4/4 [" in err, err


@pytest.mark.parametrize("mode", ["--cache-features", "--no-cache"])
def test_linear_tool(tiny, capsys, mode):
    root, train, val = tiny
    flags = [mode] if mode == "--cache-features" else []
    code = run_tool("linear_eval.py", [str(root / "run"), "--train-shards", train, "--val-shards", val,
                                       "--workers", "0", "--batch-size", "12", "--epochs", "1", "--lr", "0.1", "1.0",
                                       "--image-size", "32", "--out", str(root / f"linear{mode}.json"), *flags])
    assert code == 0
    assert "<- best" in capsys.readouterr().out
    record = json.loads((root / f"linear{mode}.json").read_text())
    assert len(record["per_lr"]) == 2 and 0 <= record["top1"] <= 100 and record["cache_features"] == bool(flags)


def test_group_quality_tool(tiny, capsys):
    root, _, val = tiny
    code = run_tool("group_quality.py", [str(root / "run"), val, str(root / "gq"), "--workers", "0"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((root / "gq" / "group_quality.json").read_text())
    assert summary["num_samples"] == 12 and summary["num_groups"] == 5 and summary["num_classes"] == 3
    assert sum(summary["group_sizes"]) == 12 and summary["step"] == 7
    assert (root / "gq" / "group_quality.png").read_bytes()[:4] == b"\x89PNG"
