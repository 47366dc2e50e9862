"""Memory estimates (smog_scale/launch/memory_estimate.py, tools/memory.py) and the one-line CUDA out-of-memory error."""

from __future__ import annotations

import re
import runpy
import signal
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from torch.distributed._tools.mem_tracker import MemTracker

from smog_scale import train
from smog_scale.config.validation import load_config
from smog_scale.data.multicrop import normalize
from smog_scale.launch import memory_estimate
from smog_scale.models.smog import SMoGModel
from smog_scale.training.optim import build_optimizer
from tests.helpers import ROOT, TINY

# A ResNet-18 at 64 px with one crop size (torch's MemTracker cannot follow a module called twice a step).
SMALL = ["data.train_shards=unused", "model.backbone=resnet18", "model.proj_hidden_dim=256", "model.proj_dim=32",
         "model.pred_hidden_dim=256", "optim.global_batch_size=16", "data.crops=[{size: 64, count: 2}]"]
NOTE = re.compile(r"# Memory \(estimated by tools/memory\.py, not measured on a GPU\): ([\d.]+) GiB per device at "
                  r"(\d+) images per device,\n# (\d+) processes in (bf16) ")
GPU_RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if p.stem.startswith(("r50", "swin_t", "byol_")))


def test_fake_cuda_counts_what_a_real_forward_saves():
    """The same forward on real CPU tensors and on fake CUDA tensors saves the same bytes (float32)."""
    cfg = load_config(ROOT / "recipes" / "demo_cpu.yaml", SMALL)
    torch.manual_seed(0)
    real = memory_estimate.saved_activation_bytes(memory_estimate.build_model(cfg, "cpu"),
                                         [torch.randn(s) for s in memory_estimate.crop_shapes(cfg, 4)], "no")
    model = memory_estimate.build_model(cfg)
    with memory_estimate.fake_cuda():
        model.to_empty(device="cuda")
        fake = memory_estimate.saved_activation_bytes(model, [torch.empty(s, device="cuda") for s in memory_estimate.crop_shapes(cfg, 4)],
                                             "no")
    assert real == fake and real[0] > 0 and real[1] > 0


def test_bf16_autocast_applies_on_fake_cuda():
    """bf16 activations take about half the bytes of float32 ones (autocast is not silently off)."""
    cfg = load_config(ROOT / "recipes" / "r50_400ep.yaml", ["optim.global_batch_size=512"])
    bf16, fp32 = (memory_estimate.estimate(cfg, 8, precision).parts["activations"] for precision in ("bf16", "no"))
    assert 0.4 < bf16 / fp32 < 0.6


def test_estimate_bounds_the_peak_measured_on_cpu():
    """The estimate against the peak that torch's MemTracker measures over two real float32 steps
    (forward, backward, LARS step) of the same networks and batch: above it, and within 10%."""
    cfg = load_config(ROOT / "recipes" / "demo_cpu.yaml", SMALL)
    estimate = memory_estimate.estimate(cfg, processes=1, precision="no")
    torch.manual_seed(0)
    model = memory_estimate.build_model(cfg, "cpu")
    model.momentum.requires_grad_(True)  # MemTracker hooks every parameter it sees; no_grad: no gradient appears
    optimizer = build_optimizer(model, cfg.optim, lr=0.1)
    images = [torch.randint(0, 255, shape, dtype=torch.uint8) for shape in memory_estimate.crop_shapes(cfg, 16)]
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    peak = 0
    with tracker:
        for _ in range(2):
            out = model([normalize(x) for x in images])
            (out.p.sum() + out.z.sum()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del out
            peak = max(peak, tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
            tracker.reset_mod_stats()
    assert peak <= estimate.total <= 1.1 * peak, (peak, estimate.parts)


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=[p.stem for p in GPU_RECIPES])
def test_recipe_states_its_estimated_memory(recipe):
    """Each GPU recipe's comment gives the estimate for its documented launch; it must be today's."""
    found = NOTE.search(recipe.read_text())
    assert found, f"{recipe.name} has no memory note"
    gib, batch, processes, precision = found.groups()
    estimate = memory_estimate.estimate(load_config(recipe), int(processes), precision)
    assert estimate.batch_size_per_device == int(batch)
    assert f"{estimate.total / memory_estimate.GIB:.1f}" == gib, estimate.summary()


def test_tool_prints_the_estimate_and_refuses_a_batch_that_does_not_split(capsys):
    main = runpy.run_path(str(ROOT / "tools" / "memory.py"))["main"]
    assert main([str(ROOT / "recipes" / "demo_cpu.yaml"), *SMALL, "--processes", "1", "2", "--precision", "no"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "at 16 images per device (1 processes" in lines[0] and "at 8 images" in lines[1]
    assert main([str(ROOT / "recipes" / "demo_cpu.yaml"), *SMALL, "--processes", "3"]) == 2
    assert "not divisible by world size 3" in capsys.readouterr().err


@pytest.fixture
def fresh_accelerator():
    """The trainer in-process leaves Accelerate's shared state and its signal handlers behind."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def test_cuda_out_of_memory_at_step_1_ends_with_one_line(tmp_path, shards, monkeypatch, capsys, fresh_accelerator):
    """The trainer in-process; the model's forward raises CUDA's out-of-memory error at step 1."""
    def out_of_memory(*_args, **_kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(SMoGModel, "forward", out_of_memory)
    code = train.main([str(ROOT / "recipes" / "demo_cpu.yaml"), f"run.output_dir={tmp_path}",
                       f"data.train_shards={shards}", *TINY, "optim.grad_accum_steps=2"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line == ("smog_scale: error: CUDA out of memory at step 1 with 8 images per device "
                    "(optim.global_batch_size=16 / (1 processes x optim.grad_accum_steps=2)): launch more "
                    "processes or set optim.grad_accum_steps=4 to halve the per-device batch; "
                    "`python tools/memory.py RECIPE --processes N` estimates the memory")
    assert not (Path(tmp_path) / "checkpoints").exists()
