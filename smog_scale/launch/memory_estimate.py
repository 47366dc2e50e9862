"""Peak device memory of one training step at a recipe's per-device batch, estimated without the device.

``estimate`` adds up, per device (docs/method.md, "One training step"):

- weights: the online encoder, predictor and momentum encoder with their buffers, float32;
- gradients: float32, one per trained parameter;
- DDP buckets: with more than one process, DDP's reducer keeps flat buckets as large as the gradients;
- optimizer state: one buffer per trained parameter for LARS / SGD (momentum), two for AdamW;
- inputs: the crops of one micro-batch on the device, uint8 as loaded and float32 normalized;
- activations: the tensors autograd saves for the backward pass of the online forward over every crop.
  They are counted with torch's saved-tensor hooks during a forward over FAKE CUDA tensors
  (``FakeTensorMode``: shapes and dtypes only, neither memory nor compute) at the full per-device
  batch, under CUDA autocast in the launch's precision, once per storage; the parameters are left
  out (they are weights), autocast's low-precision copies of them are counted;
- momentum forward: the largest input + output of one module of the momentum encoder, which runs
  without a graph after the online forward, so its activations are freed layer by layer.

The total counts the larger of gradients and momentum forward (one runs before the backward pass,
the other during it). It is an upper bound of ``torch.cuda.max_memory_allocated`` over a step (the
trainer's logged ``peak_memory_gb``): it holds every saved activation and every gradient at once, while
the backward pass frees the first as it allocates the second. Not included: the CUDA context (outside the
allocator, about 0.5-1 GiB), the allocator's fragmentation, and the re-grouping's k-means (README, "The grouping at
scale"). Under DeepSpeed ZeRO the optimizer state (and at stage 2 the gradients) are sharded, so the
figure is an upper bound there too. The backward pass itself does not run on fake CUDA tensors in torch
2.14 (the autograd engine asks the driver for the device), hence the bound rather than a simulation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from smog_scale.config.derived import derive
from smog_scale.config.schema import Config
from smog_scale.config.validation import crop_specs
from smog_scale.models.smog import SMoGModel

Precision = Literal["no", "bf16", "fp16"]
AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZER_BUFFERS = {"lars": 1, "sgd": 1, "adamw": 2}
GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device for one step, by part (see the module docstring)."""

    batch_size_per_device: int
    processes: int
    precision: str
    parts: dict[str, int]

    @property
    def total(self) -> int:
        """Everything but the smaller of gradients and momentum forward: the momentum forward runs
        (and frees its activations) before the backward pass allocates the gradients."""
        return sum(self.parts.values()) - min(self.parts["gradients"], self.parts["momentum_forward"])

    def summary(self) -> str:
        """One line: the total and its parts in GiB."""
        parts = ", ".join(f"{name} {size / GIB:.2f}" for name, size in self.parts.items())
        return (f"{self.total / GIB:.1f} GiB per device at {self.batch_size_per_device} images per device "
                f"({self.processes} processes, precision {self.precision}): {parts}")


def crop_shapes(cfg: Config, batch: int) -> list[tuple[int, ...]]:
    """The model's input: one [views, batch, 3, S, S] per crop size, in order of first appearance
    (as ``multicrop.collate_views`` batches them)."""
    views: dict[int, int] = {}
    for spec in crop_specs(cfg):
        views[spec.size] = views.get(spec.size, 0) + spec.count
    return [(count, batch, 3, size, size) for size, count in views.items()]


def build_model(cfg: Config, device: str | torch.device = "meta") -> SMoGModel:
    """The recipe's SMoG networks, uninitialized on ``device`` (meta: no memory)."""
    m = cfg.model
    with torch.device(device):
        return SMoGModel(m.backbone, m.proj_hidden_dim, m.proj_dim, m.pred_hidden_dim, m.backbone_kwargs)


def saved_activation_bytes(model: SMoGModel, crops: list[torch.Tensor], precision: Precision) -> tuple[int, int]:
    """(bytes autograd saves in the online forward, largest input + output of a momentum-encoder module).

    Runs ``model(crops)`` under autocast in ``precision`` on the crops' device type. Saved tensors are
    counted once per storage; storages of the model's parameters are left out.
    """
    parameters = {p.untyped_storage()._cdata for p in model.parameters()}  # _cdata: the storage's identity
    saved: dict[int, int] = {}
    largest_momentum_step = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    def momentum_step(_module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal largest_momentum_step
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        largest_momentum_step = max(largest_momentum_step, sum(t.nbytes for t in tensors))

    leaves = [m for m in model.momentum.modules() if not list(m.children())]
    handles = [m.register_forward_hook(momentum_step) for m in leaves]
    dtype = AUTOCAST_DTYPES[precision]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                torch.autocast(crops[0].device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(crops)  # kept alive until the count is done: its graph holds the saved tensors
        del out
    finally:
        for handle in handles:
            handle.remove()
    return sum(saved.values()), largest_momentum_step


@contextmanager
def fake_cuda() -> Iterator[None]:
    """A context where tensors on "cuda" are fake and CUDA autocast accepts bf16 without a driver."""
    with FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True), \
            mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        yield


def estimate(cfg: Config, processes: int, precision: Precision) -> MemoryEstimate:
    """Peak bytes per device of a step of ``cfg`` launched with ``processes`` processes in ``precision``.

    Raises ConfigError when the global batch does not split over processes x accumulation."""
    batch = derive(cfg, processes, num_samples=10**9).batch_size_per_device
    model = build_model(cfg)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    shapes = crop_shapes(cfg, batch)
    pixels = sum(torch.Size(shape).numel() for shape in shapes)
    with fake_cuda():
        model.to_empty(device="cuda")
        crops = [torch.empty(shape, device="cuda") for shape in shapes]
        activations, momentum_step = saved_activation_bytes(model, crops, precision)
    parts = {
        "weights": sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())),
        "gradients": trained,
        "ddp_buckets": trained if processes > 1 else 0,
        "optimizer_state": trained * OPTIMIZER_BUFFERS[cfg.optim.name],
        "inputs": pixels * (1 + 4),
        "activations": activations,
        "momentum_forward": momentum_step,
    }
    return MemoryEstimate(batch, processes, precision, parts)
