"""What the trainer settles with DeepSpeed: a skipped step's gradients do not reach the next step (ZeRO-1 and -2
on DeepSpeed's CPU accelerator); the probe the self-check runs for it, in-process without DeepSpeed."""

from __future__ import annotations

import json

import pytest
from accelerate import Accelerator

from smog_scale.config.validation import load_config
from smog_scale.launch.skip_probe import skipped_step_difference
from tests.helpers import ROOT, TINY, launch_deepspeed

# Under ``accelerate launch``: the probe on the recipe of the command line, its result as the last line.
PROBE = '''
import json, sys
from smog_scale.config.validation import load_config
from smog_scale.launch.skip_probe import skipped_step_difference
from smog_scale.training.loop import make_accelerator
print("probe:", json.dumps(skipped_step_difference(load_config(sys.argv[1], sys.argv[2:]), make_accelerator)))
'''


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_skipped_step_leaves_no_gradients_behind(tmp_path, shards, stage):
    """A step whose second micro-batch is not finite, then a clean step, gives the weights of the clean step
    alone, under DeepSpeed ZeRO ``stage`` in bf16 (accelerate's optimizer wrapper does not zero gradients)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    done = launch_deepspeed(tmp_path / "run", shards, "bf16", "optim.grad_accum_steps=2", script=script, stage=stage)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    difference, change = json.loads(done.stdout.split("probe:")[-1])
    assert change > 0 and difference == 0, (difference, change)


def test_skipped_step_probe_without_deepspeed(tmp_path, shards):
    """In one process without DeepSpeed the optimizer's zero_grad drops a skipped step's gradients: the probe
    sees no difference, and a clean step that moved the weights."""
    cfg = load_config(ROOT / "recipes" / "demo_cpu.yaml", [f"run.output_dir={tmp_path}", f"data.train_shards={shards}",
                                                            *TINY, "optim.grad_accum_steps=2", "optim.name=sgd"])
    difference, change = skipped_step_difference(
        cfg, lambda cfg: Accelerator(cpu=True, gradient_accumulation_steps=cfg.optim.grad_accum_steps))
    assert change > 0 and difference == 0, (difference, change)
