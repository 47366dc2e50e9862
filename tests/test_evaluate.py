"""kNN against a brute-force reference (one process and two gloo ranks), linear probe, group quality,
plots, and the evaluation tools end to end on tiny shards."""

from __future__ import annotations

import io
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from accelerate import Accelerator
from gloo import run_on_ranks
from helpers import summation_atol
from PIL import Image

from smog_scale.data.shards import build_eval_loader
from smog_scale.eval.batchnorm import reestimate_batchnorm
from smog_scale.eval.features import extract_features
from smog_scale.eval.group_quality import group_assignments, group_quality
from smog_scale.eval.knn import knn_evaluate, knn_neighbors, knn_vote
from smog_scale.eval.linear_probe import LinearProbe, probe_accuracy, shuffled_batches, train_linear_probe
from smog_scale.eval.plots import plot_group_quality
from smog_scale.export.timm_export import export_timm

TOOLS = Path(__file__).parent.parent / "tools"


def clustered(n: int, num_classes: int, dim: int, seed: int, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm features around one random centre per class, and their labels."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return F.normalize(centres[labels] + noise * torch.randn(n, dim, generator=gen), dim=1), labels


def brute_force_knn(train, train_labels, val, k, temperature, num_classes):
    """The textbook weighted kNN: the full similarity matrix, top k, one-hot votes."""
    sims = val @ train.t()
    top, index = sims.topk(min(k, len(train)), dim=1)
    one_hot = F.one_hot(train_labels[index], num_classes).float()
    return (one_hot * (top / temperature).exp().unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("num_train, k", [(300, 20), (5, 20)])
def test_knn_equals_brute_force(num_train, k):
    train, train_labels = clustered(num_train, 7, 12, seed=0)
    val, val_labels = clustered(50, 7, 12, seed=1)
    expected = brute_force_knn(train, train_labels, val, k, 0.07, 7)
    sims, labels = knn_neighbors(train, train_labels, val, k, query_chunk=7, train_chunk=13)
    # a similarity (12 products of unit vectors) moves exp(s / 0.07) by its error / 0.07; a vote adds <= k terms
    rtol = summation_atol(torch.float32, 12) / 0.07 + summation_atol(torch.float32, k)
    torch.testing.assert_close(knn_vote(sims, labels, 7, 0.07), expected, rtol=rtol, atol=0)
    result = knn_evaluate(train, train_labels, val, val_labels, k=k, num_classes=7, query_chunk=7, train_chunk=13)
    ranked = expected.argsort(dim=1, descending=True)
    assert result["knn_top1"] == pytest.approx(100 * (ranked[:, 0] == val_labels).float().mean().item())
    top5 = (ranked[:, :5] == val_labels[:, None]).any(1).float().mean().item()
    assert result["knn_top5"] == pytest.approx(100 * top5)
    if num_train == 300:
        assert result["knn_top1"] > 80  # well-separated clusters


def _knn_on_ranks(rank: int, world: int, train, train_labels, val, val_labels) -> dict:
    cut_train, cut_val = [0, 170, len(train)], [0, 20, len(val)]  # uneven shares
    mine = slice(cut_train[rank], cut_train[rank + 1])
    theirs = slice(cut_val[rank], cut_val[rank + 1])
    return knn_evaluate(train[mine], train_labels[mine], val[theirs], val_labels[theirs], train_chunk=50)


@pytest.mark.slow
def test_knn_on_two_ranks_equals_one_process():
    train, train_labels = clustered(300, 7, 12, seed=0, noise=2.0)
    val, val_labels = clustered(50, 7, 12, seed=1, noise=2.0)
    expected = knn_evaluate(train, train_labels, val, val_labels)
    results = run_on_ranks(_knn_on_ranks, 2, train, train_labels, val, val_labels)
    # shares of correct images: the counts must be equal, approx only absorbs the float division
    assert results[0] == results[1] == pytest.approx(expected)


def test_extract_features_normalizes_and_restores_mode():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.BatchNorm1d(5)).train()
    batches = [(torch.randn(4, 3, 2, 2), torch.arange(4), ["a"] * 4),
               (torch.randn(2, 3, 2, 2), torch.tensor([7, 8]), ["b"] * 2)]
    feats, labels = extract_features(model, batches, Accelerator(cpu=True))
    assert model.training and feats.shape == (6, 5) and labels.tolist() == [0, 1, 2, 3, 7, 8]
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(6))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats[:4], F.normalize(model(batches[0][0]), dim=1))  # the same ops: defaults


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four linearly separable classes on an offset, badly scaled 16-d space (BN has work to do)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=gen)
    feats = 4.0 * F.one_hot(labels, 16).float() + 0.5 * torch.randn(n, 16, generator=gen)
    return 30.0 + feats * torch.linspace(0.2, 5.0, 16), labels


def test_linear_probe_separates_separable_features_and_heads_train_independently():
    accelerator = Accelerator(cpu=True)
    train, train_labels = separable(400, seed=0)
    val, val_labels = separable(200, seed=1)

    def epoch_batches(epoch):
        return shuffled_batches(train, train_labels, 50, epoch)

    torch.manual_seed(0)
    probe = LinearProbe(16, 4, num_heads=2)
    alone = LinearProbe(16, 4, num_heads=1)
    alone.heads[0].load_state_dict(probe.heads[0].state_dict())
    for p, lrs in ((probe, [0.1, 1.0]), (alone, [0.1])):
        train_linear_probe(p, accelerator, epoch_batches, epochs=6, steps_per_epoch=8, lrs=lrs)
    results = probe_accuracy(probe, val, val_labels, chunk=64)
    assert min(r["top1"] for r in results) >= 99.0 and all(r["top5"] == 100.0 for r in results)
    for a, b in zip(probe.heads[0].parameters(), alone.heads[0].parameters()):
        torch.testing.assert_close(a, b)  # the same ops on the same numbers (see LinearProbe): defaults


def test_linear_probe_rejects_short_epochs():
    probe, one_batch = LinearProbe(4, 2), (torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    with pytest.raises(RuntimeError, match="ended after 1 of 3 steps"):
        train_linear_probe(probe, Accelerator(cpu=True), lambda epoch: [one_batch],
                           epochs=1, steps_per_epoch=3, lrs=[0.1])


def test_group_entropy_hand_computed():
    assignments = torch.tensor([0, 0, 0, 1, 1, 2])
    labels = torch.tensor([0, 0, 1, 2, 2, 1])
    summary = group_quality(assignments, labels, num_groups=4, num_classes=3)
    h0 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))  # group 0: two of class 0, one of class 1
    assert summary["group_entropy"] == pytest.approx([h0, 0.0, 0.0, None], abs=1e-6)
    assert summary["group_sizes"] == [3, 2, 1, 0] and summary["non_empty_groups"] == 3
    assert summary["mean_entropy"] == pytest.approx(h0 / 3)
    assert summary["weighted_mean_entropy"] == pytest.approx(3 * h0 / 6)
    assert summary["max_entropy"] == pytest.approx(math.log(3))


def test_group_assignments_and_plot(tmp_path):
    groups = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), dim=1)
    feats = torch.tensor([[2.0, 0.1], [0.1, 3.0], [-1.0, -0.5], [5.0, -1.0]])
    batches = [(feats[:2], torch.tensor([0, 1])), (feats[2:], torch.tensor([2, 0]))]
    assignments, labels = group_assignments(torch.nn.Identity(), groups, batches, Accelerator(cpu=True))
    assert assignments.tolist() == [0, 1, 2, 0] and labels.tolist() == [0, 1, 2, 0]
    summary = group_quality(assignments, labels, num_groups=3, num_classes=3)
    assert summary["mean_entropy"] == 0.0
    plot_group_quality(summary, tmp_path / "fig5.png")
    assert (tmp_path / "fig5.png").read_bytes()[:4] == b"\x89PNG"


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


def write_shards(root: Path, name: str, per_class: int, num_shards: int = 2, seed: int = 0) -> str:
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
    from test_export import make_run  # here, not at the top: gloo ranks import this module, timm not needed there

    root = tmp_path_factory.mktemp("eval")
    make_run(root / "run", "test_resnet", image_size=32)
    export_timm(root / "run", root / "export")
    return root, write_shards(root / "train", "train", 12), write_shards(root / "val", "val", 4, seed=1)


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


def test_reestimate_batchnorm_is_the_plain_average_of_the_batch_statistics():
    """Against a plain computation on fresh random inputs: running mean = mean of the batch means, running
    variance = mean of the unbiased batch variances (equal batch sizes); weights, mode and momentum restored."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 5, 1), torch.nn.BatchNorm2d(5))
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = [torch.randn(6, 3, 8, 8) * 2 + 1 for _ in range(3)]
    assert reestimate_batchnorm(model, iter(batches)) == 3
    with torch.no_grad():
        conv = [model[0](x) for x in batches]
        normed = [F.batch_norm(c, None, None, model[1].weight, model[1].bias, training=True) for c in conv]
        for layer, outs in ((model[1], conv), (model[4], [model[3](model[2](n)) for n in normed])):
            means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
            variances = torch.stack([o.transpose(0, 1).flatten(1).var(dim=1) for o in outs]).mean(0)
            # BatchNorm's kernel and the running average add the 3 x 6 x 6 x 6 values per channel in other orders
            terms, values = 3 * outs[0][:, 0].numel(), torch.stack(outs)
            torch.testing.assert_close(layer.running_mean, means, rtol=0,
                                       atol=summation_atol(torch.float32, terms, float(values.abs().max())))
            torch.testing.assert_close(layer.running_var, variances, rtol=0,  # squares: magnitude max x^2
                                       atol=summation_atol(torch.float32, terms, float(values.square().max())))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert model[1].momentum == 0.3 and model[4].momentum == 0.1
    with pytest.raises(ValueError, match="no batch"):
        reestimate_batchnorm(model, iter([]))


def test_reestimate_batchnorm_keeps_dropout_off():
    """Only the statistics change: dropout (and timm's drop path) stay in eval mode while they are gathered."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Dropout(0.9), torch.nn.BatchNorm1d(3))
    batch = torch.randn(32, 3)
    reestimate_batchnorm(model, [batch])
    torch.testing.assert_close(model[1].running_mean, batch.mean(0))


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
