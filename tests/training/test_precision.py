"""The trainer in reduced precision on the CPU: bf16 autocast through Accelerate, and fp16 under DeepSpeed.

What runs where (torch 2.14, accelerate 1.15, DeepSpeed 0.19 on this CPU):
- ``--mixed_precision bf16`` without DeepSpeed: CPU autocast in bf16 (tested here), at crops where no convolution
  has taps that see only padding (training/cpu_bf16.py).
- ``--mixed_precision fp16`` without DeepSpeed: Accelerate enables neither autocast nor a GradScaler on the
  CPU, so the run is float32; the GradScaler path is tested in-process (training/test_step.py).
- DeepSpeed bf16: DeepSpeed's CPU accelerator supports it (tests/test_train.py).
- DeepSpeed fp16: the CPU accelerator declares fp16 unsupported unless oneDNN has fp16 kernels (AVX512-FP16 /
  AMX), which this CPU lacks, although torch computes fp16 on it; the test lifts that one check so DeepSpeed's
  fp16 engine, loss scaler and overflow skipping run for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import BF16_CROPS, float_dtypes, launch, launch_deepspeed, records

# DeepSpeed's CPU accelerator asks oneDNN whether the CPU has fp16 kernels; torch runs fp16 without them.
FP16_ON_CPU = '''
import sys
from deepspeed.accelerator import get_accelerator
type(get_accelerator()).is_fp16_supported = lambda self: True
from smog_scale import train
sys.exit(train.main())
'''


def check_run(run: Path, steps: int) -> dict:
    """Finite losses on every step, float32 G; returns the final trainer state."""
    losses = [r["loss"] for r in records(run)]
    assert len(losses) == steps and all(abs(x) < 1e3 for x in losses), losses  # NaN fails the comparison
    ckpt = max((run / "checkpoints").glob("step_*"))
    assert load_file(str(ckpt / "smog.safetensors"))["groups"].dtype == torch.float32
    return json.loads((ckpt / "trainer_state.json").read_text())


@pytest.mark.slow
def test_bf16_autocast_on_cpu(tmp_path, shards):
    """At crops where no convolution has taps that see only padding (smaller ones are refused: test_train.py)."""
    run = tmp_path / "run"
    launch(run, shards, "run.max_steps=4", "run.mixed_precision=bf16", *BF16_CROPS)  # a re-grouping at step 3
    state = check_run(run, 4)
    assert (state["global_step"], state["data_steps"], state["overflow_steps"]) == (4, 4, 0)
    weights = load_file(str(run / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert float_dtypes(weights, "momentum.") == float_dtypes(weights, "online.") == {torch.float32}


@pytest.mark.slow
def test_deepspeed_fp16_with_accumulation_skips_overflow_steps(tmp_path, shards):
    """DeepSpeed's dynamic loss scale starts at 2^16 and overflows the fp16 gradients of the first steps:
    those steps are skipped and counted, the others train; momentum encoder and G stay float32. The
    recipe's accumulation reaches DeepSpeed (whose config file says 1)."""
    script, run = tmp_path / "fp16_on_cpu.py", tmp_path / "run"
    script.write_text(FP16_ON_CPU)
    done = launch_deepspeed(run, shards, "fp16", "run.max_steps=4", "optim.grad_accum_steps=2", script=script)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    state = check_run(run, 4)
    assert state["global_step"] == 4 and state["overflow_steps"] >= 1 and state["nonfinite_steps"] == 0
    assert state["data_steps"] == state["global_step"] + state["overflow_steps"]
    assert records(run)[-1]["overflow_steps"] == state["overflow_steps"]
    ckpt = run / "checkpoints" / "step_00000004"
    saved = torch.load(ckpt / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)
    assert float_dtypes(saved["module"], "online.") == {torch.float16}
    assert float_dtypes(saved["module"], "momentum.") == {torch.float32}
    assert (saved["ds_config"]["gradient_accumulation_steps"], saved["ds_config"]["train_batch_size"]) == (2, 16)
