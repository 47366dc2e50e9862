"""What the tests share: the tiny recipe and demo shards, the trainer launched or stepped in-process, gloo ranks,
a checkpoint's parts, small shards and an HTTP server for them, and tolerances for float comparisons.

Test modules import from here, never from each other; fixtures are in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import webdataset as wds
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file, save_file

from smog_scale.config.schema import Config, DataConfig, ModelConfig, dump
from smog_scale.config.validation import load_config
from smog_scale.data.converter.make_shards import ConvertOptions, convert
from smog_scale.data.multicrop import CropSpec
from smog_scale.data.synthetic.demo import write_demo
from smog_scale.method.feature_cache import FeatureCache
from smog_scale.method.grouping import GroupBank
from smog_scale.models.smog import SMoGModel
from smog_scale.training import loop
from smog_scale.training.step import TrainState

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
TRAIN = ROOT / "smog_scale" / "train.py"
# demo_cpu.yaml shrunk to seconds: a tiny timm ResNet at 32 px, 8 images per rank per step.
TINY = [
    "model.backbone=test_resnet", "model.proj_hidden_dim=64", "model.proj_dim=16", "model.pred_hidden_dim=64",
    "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}, {size: 16, count: 2, scale: [0.1, 0.3], blur_p: 0.5}]",
    "data.num_workers=1", "data.shuffle_buffer=20", "optim.global_batch_size=16", "optim.epochs=4",
    "grouping.num_groups=8", "grouping.cache_size=64", "grouping.regroup_every=3", "run.log_every=1",
    "run.trackers=[]", "run.save_every=1000", "monitor.knn_every_epochs=0",
]


def demo_shards(root: Path) -> Path:
    """The demo images (8 train images per class) converted into shards of 10 under ``root``; returns the folder."""
    write_demo(root / "images", train_per_class=8, val_per_class=1)
    convert(root / "images" / "train", root / "shards", ConvertOptions(samples_per_shard=10), progress=False)
    return root / "shards"


def launch(run: Path, shards: Path, *overrides: str, processes: int = 1, wait: bool = True, script: Path = TRAIN):
    """``accelerate launch`` the trainer (or ``script``, a wrapper running it) on CPU; returns the CompletedProcess
    (or the Popen)."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONUNBUFFERED="1")
    multi = ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", "0"] if processes > 1 \
        else ["--num_processes", "1"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_cpu_threads_per_process", "1",
           str(script), str(ROOT / "recipes" / "demo_cpu.yaml"), f"run.output_dir={run}",
           f"data.train_shards={shards}", *TINY, *overrides]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


# Accelerate gives a DeepSpeed launch on a machine without an accelerator no backend, so it counts one process
# whatever torch's world size is. This wrapper lets it take gloo, as ``ACCELERATE_USE_CPU`` runs do, so that
# several DeepSpeed ranks run on the CPU (DeepSpeed's CPU accelerator); it then runs the script it wraps.
GLOO_DEEPSPEED = '''
import runpy
from accelerate.state import PartialState
from accelerate.utils import DistributedType
PartialState._prepare_backend = lambda self, *args, **kwargs: ("gloo", DistributedType.MULTI_CPU)
runpy.run_path({script!r}, run_name="__main__")
'''


# bf16 on the CPU: TINY's 16- and 32-px crops give test_resnet's layer3/4 convolutions taps that see only padding,
# whose bf16 weight gradients torch leaves as garbage; the trainer refuses them (training/cpu_bf16.py).
BF16_CROPS = ["data.crops=[{size: 64, count: 2, scale: [0.3, 1.0]}, "
              "{size: 48, count: 2, scale: [0.1, 0.3], blur_p: 0.5}]"]


def launch_deepspeed(run: Path, shards: Path, precision: str, *overrides: str, script: Path = TRAIN,
                     processes: int = 1, stage: int = 2):
    """``accelerate launch`` of ``script`` (the trainer, or a wrapper calling ``train.main``) under DeepSpeed
    ZeRO ``stage`` on DeepSpeed's CPU accelerator, AdamW, bf16 at BF16_CROPS; returns the CompletedProcess. Like
    the shipped DeepSpeed configs, the launch says gradient_accumulation_steps 1 (the recipe's value must win).
    Several ``processes`` run ``script`` through ``GLOO_DEEPSPEED`` (written beside ``run``)."""
    pytest.importorskip("deepspeed")
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(DS_ACCELERATOR="cpu")
    if processes > 1:
        wrapper = run.parent / f"{run.name}_gloo_deepspeed.py"
        wrapper.write_text(GLOO_DEEPSPEED.format(script=str(script)))
        script = wrapper
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", str(stage),
           "--gradient_accumulation_steps", "1", "--num_processes", str(processes), "--num_machines", "1",
           "--main_process_port", "0", "--mixed_precision", precision, "--dynamo_backend", "no",
           str(script), str(ROOT / "recipes" / "demo_cpu.yaml"), f"data.train_shards={shards}", *TINY,
           "optim.base_lr=0.001", "optim.weight_decay=0.05", f"run.output_dir={run}", "optim.name=adamw",
           *(BF16_CROPS if precision == "bf16" else []), *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def monitor_on(shards: Path, every_epochs: int = 1) -> list[str]:
    """Overrides that run the kNN monitor every ``every_epochs`` epochs on ``shards`` (TINY turns it off)."""
    return [f"monitor.knn_train_shards={shards}", f"monitor.knn_val_shards={shards}", "monitor.image_size=32",
            f"monitor.knn_every_epochs={every_epochs}", "monitor.batch_size=16"]


def events(run: Path, name: str) -> list[dict]:
    """The ``metrics.jsonl`` records of event ``name`` (``knn``, ``regroup``...)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == name]


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def final_state(run: Path) -> dict[str, torch.Tensor]:
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    return {**load_file(str(ckpt / "model.safetensors")), **load_file(str(ckpt / "smog.safetensors"))}


def float_dtypes(state: dict[str, torch.Tensor], prefix: str) -> set[torch.dtype]:
    return {v.dtype for k, v in state.items() if k.startswith(prefix) and v.is_floating_point()}


# --- in-process training steps ---

BATCH = 8  # images per micro-batch (and per rank)


def tiny_state(run: Path, shards: Path, *overrides: str, accumulation: int = 1,
               scaler: torch.amp.GradScaler | None = None) -> TrainState:
    """``loop.build`` on the tiny recipe, global batch BATCH x (accumulation x world size).

    ``scaler`` wires a CPU GradScaler into Accelerate (it makes one only for GPUs), so the fp16 loss-scaling
    path (scaled backward, unscale, skipped optimizer step) runs on the CPU.
    """
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    accelerator.scaler = scaler
    world = accelerator.num_processes
    cfg = load_config(ROOT / "recipes" / "demo_cpu.yaml", [
        f"run.output_dir={run}", f"data.train_shards={shards}", *TINY, "data.num_samples=640",
        f"optim.global_batch_size={BATCH * accumulation * world}", f"optim.grad_accum_steps={accumulation}",
        "grouping.cache_size=128", "optim.name=sgd", "optim.warmup_epochs=0", *overrides])
    return loop.build(cfg, accelerator)


def synthetic_batch(step: int, first: int, size: int = BATCH) -> dict:
    """Samples ``first .. first + size - 1`` of step ``step``'s global batch: 2 global views at 16 px and 2
    local views at 8 px (uint8, as the loader yields them), the same pixels whichever rank or micro-batch
    draws them."""
    gen = torch.Generator().manual_seed(step)
    total = first + size
    global_views = torch.randint(0, 256, (2, total, 3, 16, 16), generator=gen, dtype=torch.uint8)
    local_views = torch.randint(0, 256, (2, total, 3, 8, 8), generator=gen, dtype=torch.uint8)
    return {"crops": [global_views[:, first:], local_views[:, first:]],
            "key": [f"step{step}-{i}" for i in range(first, total)]}


# --- gloo ranks ---

def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch_dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], world: int = 2, *args: Any) -> list[Any]:
    """Spawn ``world`` processes running ``fn(rank, world, *args)``; return their results by rank.

    ``fn`` must be a module-level function (it is pickled) and return tensors or plain containers.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, free_port(), out_dir, fn, args), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world)]


# --- a checkpoint's parts, a run folder ---

def make_parts(seed, dim_in=4, dim=3, cache_rows=8, pushed=6):
    """A stepped model + optimizer, groups and a partly filled cache: what a checkpoint holds."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(dim_in, dim)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, dim_in)).sum().backward()
    optimizer.step()
    bank, cache = GroupBank(5, dim), FeatureCache(cache_rows, dim)
    bank.updates.copy_(torch.randint(0, 9, (5,)))  # the averaging rule's counts are state too
    cache.push(torch.randn(pushed, dim), torch.arange(pushed))
    return model, optimizer, bank, cache


HEADS = {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32}


def make_run(root: Path, backbone: str, backbone_kwargs: dict | None = None, image_size: int = 64,
             steps: tuple[int, ...] = (7,), wrapper_prefix: str = "") -> SMoGModel:
    """A run folder as the trainer leaves it: config.yaml plus checkpoints/step_*/ holding a SMoGModel's
    state dict (BN statistics and the momentum encoder made to differ from their defaults / the online one)."""
    torch.manual_seed(1)  # not the seed of --random-init
    model = SMoGModel(backbone, backbone_kwargs=backbone_kwargs, **HEADS)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_mean"):
                tensor.uniform_(-0.1, 0.1)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
        for p in model.momentum.parameters():
            p.add_(0.01)
    model_cfg = ModelConfig(backbone=backbone, backbone_kwargs=backbone_kwargs or {}, **HEADS)
    crops = [{"size": image_size, "count": 2, "scale": [0.14, 1.0]}]
    root.mkdir(parents=True)
    dump(Config(model=model_cfg, data=DataConfig(train_shards="x.tar", crops=crops)), root / "config.yaml")
    state = {wrapper_prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    for step in steps:
        path = root / "checkpoints" / f"step_{step:08d}"
        path.mkdir(parents=True)
        save_file(state, str(path / "model.safetensors"))
        save_file({"groups": torch.nn.functional.normalize(torch.randn(5, 16), dim=1)}, str(path / "smog.safetensors"))
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "world_size": 1}))
    return model.eval()


# --- small shards, read locally or over HTTP ---

LOADER_CROPS = (
    CropSpec(size=16),
    CropSpec(size=16, blur_p=0.1, solarize_p=0.2),
    CropSpec(size=8, count=2, scale=(0.05, 0.14), blur_p=0.5),
)


def random_jpeg(rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=85)
    return out.getvalue()


def write_shards(root: Path, sizes: list[int], bad: frozenset[str] = frozenset()) -> str:
    """Write ``len(sizes)`` shards ``demo-00000i.tar`` plus a manifest; keys in ``bad`` get junk bytes.

    Returns the brace pattern over the shards.
    """
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for shard, size in enumerate(sizes):
        name = f"demo-{shard:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for index in range(size):
                key = f"s{shard:02d}_{index:03d}"
                image = b"not a jpeg" if key in bad else random_jpeg(rng)
                sink.write({"__key__": key, "jpg": image, "cls": shard % 3})
        entries.append({"name": name, "samples": size})
    manifest = {"format": 1, "tool_version": "test", "shards": entries, "num_samples": sum(sizes),
                "classes": ["a", "b", "c"], "options": {}, "skipped": 0, "report": ""}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root / f"demo-{{000000..{len(sizes) - 1:06d}}}.tar")


class Expired(BaseException):
    """Not an Exception: the loader's skip handlers must not swallow it."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: today's loader skips failing samples forever."""
    def expire(*_):
        raise Expired(f"no result within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def children() -> set[int]:
    """This process's live children (zombies left by killed workers do not count)."""
    return {c.pid for c in psutil.Process().children() if c.status() != psutil.STATUS_ZOMBIE}


class ShardServer:
    """python's http.server on 127.0.0.1 in a thread, serving ``folder`` and logging every GET path.

    A path under ``/stall/`` gets no answer until the server stops (a hung storage node); one under
    ``/trickle/`` gets the file's first 2 kB, then nothing more (a transfer that stalls midway).
    """

    def __init__(self, folder: Path) -> None:
        self.requests: list[str] = []
        self.release = threading.Event()
        owner = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self) -> None:
                owner.requests.append(self.path)
                if self.path.startswith("/stall/"):
                    owner.release.wait()
                    return
                if self.path.startswith("/trickle/"):
                    data = (folder / self.path.removeprefix("/trickle/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:2048])
                    self.wfile.flush()
                    owner.release.wait()
                    return
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}"

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# --- tolerances of float comparisons ---

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7: the spacing of float32 numbers just above 1


def summation_atol(dtype: torch.dtype, terms: int, magnitude: float = 1.0) -> float:
    """How far apart two computations of one sum may land when they add its ``terms`` values in other orders
    (other ranks, blocks, micro-batches, kernels or thread counts).

    Each lies within (terms - 1) * eps / 2 * sum_i |x_i| of the exact sum (the first-order bound for any
    order of addition, Higham 2002, eq. 4.4), ``magnitude`` bounding sum_i |x_i|: for a dot product of unit
    vectors it is 1. The two together: terms * eps * magnitude.
    """
    return terms * torch.finfo(dtype).eps * magnitude


def assert_argmax_up_to_rounding(labels: torch.Tensor, sims: torch.Tensor, atol: float) -> None:
    """``labels`` [B] pick, in each row of the reference scores ``sims`` [B, K], a column within ``atol`` of the
    row's maximum: the argmax wherever it leads the runner-up by more than ``atol``; in a near-tie rounding may
    pick either column."""
    best = sims.max(dim=1).values
    picked = sims.gather(1, labels.unsqueeze(1)).squeeze(1)
    assert (best - picked <= atol).all(), f"{int((best - picked > atol).sum())} rows pick a column below the max"
