"""Group quality (the paper's Fig. 5): per-group class entropy, assignments, the plot."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from smog_scale.eval.group_quality import group_assignments, group_quality
from smog_scale.eval.plots import plot_group_quality


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
