"""Scale-out on one machine: two accelerate "nodes" over loopback reading shards over HTTP, and
elastic resume (a checkpoint of W ranks resumed with another world size)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file

from smog_scale import dist
from smog_scale.config.derived import derive
from smog_scale.config.schema import Config
from smog_scale.config.validation import crop_specs, load_config
from smog_scale.data.shards import build_train_loader
from smog_scale.method import schedules
from smog_scale.training import checkpoint, loop
from tests.helpers import ROOT, TINY, ShardServer, free_port, launch, records

RECIPE = ROOT / "recipes" / "demo_cpu.yaml"
SHARD_NAMES = "shard-{000000..000007}.tar"  # the 8 demo shards of 10 images (the shards fixture)


# Runs the trainer unchanged, and after each checkpoint also writes this rank's parameters beside the
# run, so the test can compare every rank's copy (the checkpoint holds the main process's only).
PROBE = '''
import sys
from pathlib import Path
from safetensors.torch import save_file
from smog_scale import dist, train
from smog_scale.training import loop

_save = loop.save

def save(state):
    path = _save(state)
    model = state.accelerator.unwrap_model(state.model)
    params = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()}
    save_file(params, str(Path(state.cfg.run.output_dir) / f"params_rank{dist.rank()}.safetensors"))
    return path

loop.save = save
sys.exit(train.main())
'''


def launch_node(script: Path, run: Path, machine_rank: int, port: int, *overrides: str) -> subprocess.Popen:
    """One "node" of a 2-node job on loopback: one CPU process, gloo, static rendezvous at ``port``."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
           "--machine_rank", str(machine_rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(port), "--num_cpu_threads_per_process", "1", str(script), str(RECIPE),
           f"run.output_dir={run}", *TINY, *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def tiny_config(run: Path, shards_url: str, *overrides: str) -> Config:
    return load_config(RECIPE, [f"run.output_dir={run}", f"data.train_shards={shards_url}", *TINY, *overrides])


@pytest.mark.slow
def test_two_nodes_on_loopback_stream_http_shards(tmp_path, shards):
    """Each node reads its own seeded shard stream from its server; G and parameters agree on both
    ranks; one checkpoint directory holds both ranks' files, written once."""
    probe, run, steps = tmp_path / "probe.py", tmp_path / "run", 4
    probe.write_text(PROBE)
    port = free_port()
    # One server per node (as two racks behind different mirrors) so each request log is one node's.
    with ShardServer(shards) as server0, ShardServer(shards) as server1:
        servers = [server0, server1]
        nodes = [launch_node(probe, run, r, port, f"data.train_shards={s.url}/{SHARD_NAMES}", "data.num_samples=80",
                             f"run.max_steps={steps}") for r, s in enumerate(servers)]
        outs = []
        for node in nodes:
            try:
                outs.append(node.communicate(timeout=240)[0])
            finally:
                if node.poll() is None:
                    os.killpg(node.pid, 9)
        for node, out in zip(nodes, outs):
            assert node.returncode == 0, out[-3000:]
        # Each node's stream is the one its rank's seeded loader gives (replayed here in-process on the
        # same server: num_workers=0 plays worker 0 of 1), and the two streams differ.
        cfg = tiny_config(run, "unused")
        streams = []
        for rank, server in enumerate(servers):
            trained = list(server.requests)
            loader = build_train_loader(f"{server.url}/{SHARD_NAMES}", crops=crop_specs(cfg), batch_size=8,
                                        num_workers=0, seed=cfg.run.seed, rank=rank, world_size=2, num_samples=80,
                                        shuffle_buffer=cfg.data.shuffle_buffer)
            next(iter(loader))
            replay = server.requests[len(trained):]
            assert len(trained) >= len(replay) >= 2 and trained[:len(replay)] == replay, (rank, trained, replay)
            streams.append(trained)
    assert streams[0] != streams[1], streams

    saved = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in saved] == [f"step_{steps:08d}"]  # written once: no second writer, no temp left
    ckpt = saved[0]
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["config.yaml", "model.safetensors", "optimizer.bin", "smog.safetensors", "trainer_state.json", "random_states_0.pkl",
         "random_states_1.pkl", "cache_rank0.safetensors", "cache_rank1.safetensors"])
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["global_step"], state["world_size"], state["samples_seen"]) == (steps, 2, steps * 16)
    assert [r["step"] for r in records(run)] == list(range(1, steps + 1))  # one metrics writer

    groups = load_file(str(ckpt / "smog.safetensors"))["groups"]
    ranks = [load_file(str(ckpt / f"cache_rank{r}.safetensors")) for r in range(2)]
    for rank in ranks:
        assert torch.equal(rank["groups"], groups)
    assert not torch.equal(ranks[0]["ids"], ranks[1]["ids"])  # the caches hold different samples

    weights = load_file(str(ckpt / "model.safetensors"))
    assert not [k for k in weights if k.startswith("module.")]  # the unwrapped keys, not DDP's
    params = [load_file(str(run / f"params_rank{r}.safetensors")) for r in range(2)]
    assert params[0].keys() == params[1].keys() and params[0].keys() <= weights.keys()
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), name
        assert torch.equal(params[0][name], weights[name]), name


def _rows(feats: torch.Tensor, ids: torch.Tensor) -> list[tuple]:
    """A cache's (id, feature) rows as a sorted list: the multiset the union check compares."""
    return sorted(zip(ids.tolist(), map(tuple, feats.tolist())))


def _saved_caches(ckpt: Path, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each saved rank's (feats, ids), oldest first."""
    out = []
    for r in range(world):
        tensors = load_file(str(ckpt / f"cache_rank{r}.safetensors"))
        filled, ptr, cap = int(tensors["filled"]), int(tensors["ptr"]), tensors["feats"].shape[0]
        order = (ptr - filled + torch.arange(filled)) % cap
        out.append((tensors["feats"][order], tensors["ids"][order]))
    return out


def _load_in_process(tmp_path: Path, shards: Path, ckpt: Path, *overrides: str):
    """``checkpoint.load`` into a freshly built one-process trainer state; returns (state, counters)."""
    cfg = tiny_config(tmp_path / "scratch", str(shards), *overrides)
    accelerator = Accelerator(cpu=True)
    state = loop.build(cfg, accelerator)
    return state, checkpoint.load(accelerator, ckpt, state.bank, state.cache)


def _check_schedules_continue(run: Path, before: dict, first_step: int, last_step: int, world: int) -> None:
    """The resumed launch keeps the global batch and the schedules' shape; only the per-device batch
    follows the world size. Logged lr/beta at step n are those of ``global_step = n - 1``."""
    after = yaml.safe_load((run / "config.yaml").read_text())["derived"]
    for key in ("num_samples", "steps_per_epoch", "total_steps", "warmup_steps", "scaled_lr"):
        assert after[key] == before[key], key
    assert (after["world_size"], after["batch_size_per_device"]) == (world, 16 // world)
    logged = {r["step"]: r for r in records(run)}
    assert sorted(logged) == list(range(1, last_step + 1))
    for step in range(first_step, last_step + 1):
        lr = schedules.learning_rate(step - 1, after["total_steps"], after["scaled_lr"], after["warmup_steps"])
        beta = schedules.group_beta(step - 1, after["total_steps"])
        assert logged[step]["lr"] == pytest.approx(lr) and logged[step]["beta"] == pytest.approx(beta)
        assert logged[step]["samples_seen"] == step * 16
    final = sorted((run / "checkpoints").glob("step_*"))[-1]
    state = json.loads((final / "trainer_state.json").read_text())
    assert (state["global_step"], state["world_size"], state["samples_seen"]) == (last_step, world, last_step * 16)


def test_cache_size_is_the_union_over_ranks(tmp_path, shards):
    """grouping.cache_size is what k-means clusters on any world size: each rank keeps its share."""
    cfg = tiny_config(tmp_path / "run", str(shards), "grouping.cache_size=100", "optim.global_batch_size=48")
    for world, share in ((1, 100), (2, 50), (3, 33)):
        derived = derive(cfg, world, num_samples=480)
        state = loop.build(cfg, Accelerator(cpu=True), derived)
        assert derived.cache_size_per_device == state.cache.capacity == share


@pytest.mark.slow
def test_elastic_resume_two_ranks_to_one(tmp_path, shards):
    run = tmp_path / "run"
    launch(run, shards, "run.max_steps=4", processes=2)  # 4 steps x 2 views x 8 fill both ranks' 32-row shares
    ckpt = run / "checkpoints" / "step_00000004"
    before = yaml.safe_load((run / "config.yaml").read_text())["derived"]
    saved = _saved_caches(ckpt, 2)
    assert [f.shape[0] for f, _ in saved] == [32, 32] and before["cache_size_per_device"] == 32

    # One rank, the same grouping.cache_size (the union over all ranks): it holds every saved row, once.
    state, counters = _load_in_process(tmp_path, shards, ckpt)
    assert (counters["global_step"], counters["samples_seen"], counters["world_size"]) == (4, 64, 2)
    assert torch.equal(state.bank.groups, load_file(str(ckpt / "smog.safetensors"))["groups"])
    assert _rows(*state.cache.contents()) == _rows(torch.cat([f for f, _ in saved]), torch.cat([i for _, i in saved]))
    # A smaller union: the newest half of every saved rank stays.
    state, _ = _load_in_process(tmp_path, shards, ckpt, "grouping.cache_size=32")
    assert _rows(*state.cache.contents()) == _rows(torch.cat([f[16:] for f, _ in saved]),
                                                   torch.cat([i[16:] for _, i in saved]))

    out = launch(run, shards, "run.max_steps=6", processes=1)
    assert f"resumed from {ckpt} at step 4" in out.stdout
    _check_schedules_continue(run, before, 5, 6, world=1)


@pytest.mark.slow
def test_elastic_resume_one_rank_to_two(tmp_path, shards, monkeypatch):
    run = tmp_path / "run"
    launch(run, shards, "run.max_steps=2", processes=1)  # 2 steps x 2 views x 16 fill the 64-row cache
    ckpt = run / "checkpoints" / "step_00000002"
    before = yaml.safe_load((run / "config.yaml").read_text())["derived"]
    (feats, ids), = _saved_caches(ckpt, 1)
    assert feats.shape[0] == 64

    # What each of two ranks is dealt (the world size seen by checkpoint.load is faked in-process).
    dealt = []
    for rank in range(2):
        monkeypatch.setattr(dist, "world_size", lambda: 2)
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        state, _ = _load_in_process(tmp_path, shards, ckpt)
        monkeypatch.undo()
        dealt.append(state.cache.contents())
        assert torch.equal(state.bank.groups, load_file(str(ckpt / "smog.safetensors"))["groups"])
    assert [f.shape[0] for f, _ in dealt] == [32, 32]  # each rank's share of the 64-row union: full
    assert _rows(torch.cat([f for f, _ in dealt]), torch.cat([i for _, i in dealt])) == _rows(feats, ids)

    out = launch(run, shards, "run.max_steps=3", processes=2)
    assert f"resumed from {ckpt} at step 2" in out.stdout
    _check_schedules_continue(run, before, 3, 3, world=2)
    final = run / "checkpoints" / "step_00000003"
    for r in range(2):  # each rank pushed 1 step x 2 views x 8 after its dealt rows: their newest 16 stay
        feats_r, ids_r = _saved_caches(final, 2)[r]
        assert feats_r.shape[0] == 32 and torch.equal(feats_r[:16], dealt[r][0][16:])
        assert torch.equal(ids_r[:16], dealt[r][1][16:])


def test_scaling_table_formulas_and_crossover(capsys, monkeypatch):
    """tools/scaling_table.py on the r50 recipes' sizes: exact bytes for a few cells, and the crossovers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scaling_table", ROOT / "tools" / "scaling_table.py")
    tool = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "scaling_table", tool)  # dataclasses look their module up there
    spec.loader.exec_module(tool)
    s = tool.Setup(num_groups=3000, dim=128, cache_union=262144, kmeans_iters=20, init_sample=16384,
                   global_batch=4096, regroup_every=300)
    assert tool.cache_bytes(s, 16) == 16384 * (128 * 4 + 8)  # each of 16 ranks keeps 1/16 of the union
    assert tool.gather_kmeans(s, 64).peak_bytes == tool.gather_kmeans(s, 8).peak_bytes == 2 * 262144 * 128 * 4
    assert tool.gather_kmeans(s, 8).received_bytes == 7 * 32768 * 128 * 4  # rank 0's gather
    per_pass = 3000 * 128 * 4 + 3000 * 8 + 8
    assert tool.sharded_kmeans(s, 2).received_bytes == pytest.approx(
        16384 * 128 * 4 / 2 + 16384 * 129 * 4 + 2 * 3000 * 128 * 4 + 21 * per_pass)
    assert tool.sharded_kmeans(s, 8).busiest_macs == 21 * 32768 * 3000 * 128
    assert tool.group_update(s, 8).payload_bytes == 3000 * 8 + 2 * 3000 * 128 * 4
    assert tool.traffic_crossover(s) == 2 and tool.gather_fits(s, 4 * 2**30) and not tool.gather_fits(s, 2**27)
    assert tool.main(["--no-reference"]) == 0
    out = capsys.readouterr().out
    assert "| 512 | `gather` | 262,144 | 256 MiB |" in out and "is 256 MiB, within the 4 GiB budget at any W" in out
