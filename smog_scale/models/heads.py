"""Projector and predictor MLPs with the BN placement of docs/method.md "Networks"."""

from __future__ import annotations

from torch import nn


def projector(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> nn.Sequential:
    """Linear(d, 2048) -> BN -> ReLU -> Linear(2048, 128) -> BN(affine=False)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
        nn.BatchNorm1d(out_dim, affine=False),
    )


def predictor(dim: int = 128, hidden_dim: int = 2048) -> nn.Sequential:
    """Linear(128, 2048) -> BN -> ReLU -> Linear(2048, 128)."""
    return nn.Sequential(
        nn.Linear(dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, dim),
    )
