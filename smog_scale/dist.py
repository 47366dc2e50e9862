"""The one seam to ``torch.distributed``: rank info and collectives that are no-ops at world size 1.

Every function works with no process group initialized (a single process), so the core modules and
their tests never branch on the launcher. Accelerate initializes the process group; this module only
reads it.
"""

from __future__ import annotations

import warnings
from functools import cache
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.distributed.nn.functional as dist_fn


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialized."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, out of place, no gradient. Returns ``tensor`` itself at world size 1."""
    return _all_reduce(tensor, torch_dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks, out of place, no gradient. Returns ``tensor`` itself at world size 1."""
    return _all_reduce(tensor, torch_dist.ReduceOp.MAX)


def _all_reduce(tensor: torch.Tensor, op: torch_dist.ReduceOp.RedOpType) -> torch.Tensor:
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    torch_dist.all_reduce(out, op=op)
    return out


def all_reduce_sum_differentiable(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks whose backward sums the incoming gradients over ranks too.

    This is what makes a rank's loss reach the features of every other rank through a shared
    statistic (the per-group sums of docs/method.md step 3).
    """
    if not is_distributed():
        return tensor
    # Deprecated in torch 2.14 in favour of _functional_collectives, whose autograd support is new
    # there; this one is differentiable on every torch the project supports.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return dist_fn.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)


def all_gather_differentiable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0, in rank order; the backward sums the
    incoming gradients over ranks and hands each rank its own rows' share (a loss over the global batch)."""
    if not is_distributed():
        return tensor
    with warnings.catch_warnings():  # see all_reduce_sum_differentiable
        warnings.simplefilter("ignore", FutureWarning)
        return _ContiguousGradient.apply(torch.cat(dist_fn.all_gather(tensor)))


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: the gather's backward (an all-to-all on gloo)
    scrambles the rows of a non-contiguous gradient, e.g. one that comes back through a transpose (measured,
    torch 2.14; tests/method/test_dist_parity.py)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from every rank along dim 0, in rank order; ranks may hold different row counts."""
    if not is_distributed():
        return tensor
    padded, rows = _padded_to_largest(tensor)
    parts = [torch.empty_like(padded) for _ in rows]
    torch_dist.all_gather(parts, padded)
    return torch.cat([p[:r] for p, r in zip(parts, rows)])


def gather_cat(tensor: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
    """:func:`all_gather_cat`'s result on rank ``dst`` alone (None on the others, which hold nothing extra)."""
    if not is_distributed():
        return tensor
    padded, rows = _padded_to_largest(tensor)
    parts = [torch.empty_like(padded) for _ in rows] if rank() == dst else None
    torch_dist.gather(padded, parts, dst=dst)
    return None if parts is None else torch.cat([p[:r] for p, r in zip(parts, rows)])


def _padded_to_largest(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``tensor`` zero-padded to the most rows any rank holds (collectives need equal shapes), and every
    rank's row count."""
    n = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    torch_dist.all_gather(sizes, n)
    rows = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(rows), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    return padded, rows


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s copy and return it."""
    if is_distributed():
        torch_dist.broadcast(tensor, src=src)
    return tensor


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


class PeerFailed(RuntimeError):
    """Another rank stopped on an error at a point every rank agrees on; the message names it and its error."""


@cache
def _host_group() -> Any:
    """A gloo group for agreements on the host (no CUDA stream to wait for); None: the default group is gloo.
    Made at the first agreement, which every rank reaches at the same point."""
    return None if torch_dist.get_backend() == "gloo" else torch_dist.new_group(backend="gloo")


def agree_on_failure(error: BaseException | None) -> None:
    """Every rank's outcome at the same point of its loop (``error``: this rank's, or None), agreed on the host.

    Raises PeerFailed on the ranks that were fine when another was not, naming the failed ranks and their
    errors' last lines; returns on the failed ranks (their caller raises their own error) and when all were
    fine. One all-reduce of one number; the messages are gathered only after a failure."""
    if not is_distributed():
        return
    group = _host_group()
    failed = torch.tensor([0 if error is None else 1], device="cpu")  # on the host: the group is gloo
    torch_dist.all_reduce(failed, op=torch_dist.ReduceOp.MAX, group=group)
    if not failed.item():
        return
    lines: list[str | None] = [None] * world_size()
    own = None if error is None else f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[-1]}"
    torch_dist.all_gather_object(lines, own, group=group)
    if error is None:
        named = "; ".join(f"rank {r}: {line}" for r, line in enumerate(lines) if line is not None)
        raise PeerFailed(f"stopped because another rank failed ({named})")
