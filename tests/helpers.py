"""Tolerances for tests that compare two float computations of one result."""

from __future__ import annotations

import torch

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
