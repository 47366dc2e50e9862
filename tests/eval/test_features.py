"""Feature extraction: unit-norm features and labels of every batch, the model's mode given back."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from smog_scale.eval.features import extract_features


def test_extract_features_normalizes_and_restores_mode():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.BatchNorm1d(5)).train()
    batches = [(torch.randn(4, 3, 2, 2), torch.arange(4), ["a"] * 4),
               (torch.randn(2, 3, 2, 2), torch.tensor([7, 8]), ["b"] * 2)]
    feats, labels = extract_features(model, batches, Accelerator(cpu=True))
    assert model.training and feats.shape == (6, 5) and labels.tolist() == [0, 1, 2, 3, 7, 8]
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(6))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats[:4], F.normalize(model(batches[0][0]), dim=1))  # the same ops: defaults
