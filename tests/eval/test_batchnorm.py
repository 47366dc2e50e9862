"""BatchNorm re-estimation: the plain average of the batch statistics, nothing else changed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smog_scale.eval.batchnorm import reestimate_batchnorm
from tests.helpers import summation_atol


def test_reestimate_batchnorm_is_the_plain_average_of_the_batch_statistics():
    """Against a plain computation on fresh random inputs: running mean = mean of the batch means, running
    variance = mean of the unbiased batch variances (equal batch sizes); weights, mode and momentum restored."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 5, 1), torch.nn.BatchNorm2d(5))
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = [torch.randn(6, 3, 8, 8) * 2 + 1 for _ in range(3)]
    assert reestimate_batchnorm(model, iter(batches)) == 3
    with torch.no_grad():
        conv = [model[0](x) for x in batches]
        normed = [F.batch_norm(c, None, None, model[1].weight, model[1].bias, training=True) for c in conv]
        for layer, outs in ((model[1], conv), (model[4], [model[3](model[2](n)) for n in normed])):
            means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
            variances = torch.stack([o.transpose(0, 1).flatten(1).var(dim=1) for o in outs]).mean(0)
            # BatchNorm's kernel and the running average add the 3 x 6 x 6 x 6 values per channel in other orders
            terms, values = 3 * outs[0][:, 0].numel(), torch.stack(outs)
            torch.testing.assert_close(layer.running_mean, means, rtol=0,
                                       atol=summation_atol(torch.float32, terms, float(values.abs().max())))
            torch.testing.assert_close(layer.running_var, variances, rtol=0,  # squares: magnitude max x^2
                                       atol=summation_atol(torch.float32, terms, float(values.square().max())))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert model[1].momentum == 0.3 and model[4].momentum == 0.1
    with pytest.raises(ValueError, match="no batch"):
        reestimate_batchnorm(model, iter([]))


def test_reestimate_batchnorm_keeps_dropout_off():
    """Only the statistics change: dropout (and timm's drop path) stay in eval mode while they are gathered."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Dropout(0.9), torch.nn.BatchNorm1d(3))
    batch = torch.randn(32, 3)
    reestimate_batchnorm(model, [batch])
    torch.testing.assert_close(model[1].running_mean, batch.mean(0))
