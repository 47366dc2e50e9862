"""The step's, the re-grouping's, the k-means' and the logging's device math on CUDA, without a GPU.

torch's FakeTensorMode (with a ShapeEnv for data-dependent shapes) makes CUDA tensors on a CPU-only
machine and raises on a device mismatch as CUDA does; CUDA autocast is switched on as on a GPU (torch
turns it off when it finds no driver). Forwards and tensor math run there; backward and host reads
(``.item()``, ``.tolist()``, ``float()``) do not, so each test covers the device math between the host
reads at the edges: the engine's flags all-reduce, the k-means loop's convergence test, the logging.
A tensor made without ``device=`` lands on the CPU and fails these tests (test_harness_catches_...).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from smog_scale.data.multicrop import normalize
from smog_scale.method import kmeans, kmeans_seeding
from smog_scale.method.accumulation import StepAccumulator
from smog_scale.method.centroid_search import NearestCentroid
from smog_scale.method.feature_cache import FeatureCache
from smog_scale.method.grouping import GroupBank, assign
from smog_scale.method.health import assignment_health, cluster_size_health
from smog_scale.method.objectives import byol_step, grouping_step, instance_warmup_step
from smog_scale.models.smog import SMoGModel
from smog_scale.training.step import step_flags

K, D, B = 8, 16, 4  # groups, feature dimension, images per view


@pytest.fixture
def cuda(monkeypatch):
    """Inside fake-CUDA mode: the device to put things on."""
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()):
        yield torch.device("cuda", 0)


@pytest.fixture
def model() -> SMoGModel:
    """A tiny SMoGModel built on the CPU (outside the fake mode); tests move it to fake CUDA."""
    torch.manual_seed(0)
    return SMoGModel("test_resnet", proj_hidden_dim=32, proj_dim=D, pred_hidden_dim=32)


def crops(device: torch.device) -> list[torch.Tensor]:
    """2 global views at 32 px and 2 local views at 16 px, as the loader's uint8 normalized on ``device``."""
    return [normalize(torch.randint(0, 256, (2, B, 3, size, size), dtype=torch.uint8, device=device))
            for size in (32, 16)]


def test_harness_catches_a_cpu_tensor(cuda):
    with pytest.raises(FakeTensorDeviceMismatchError):
        torch.ones(3, device=cuda) + torch.ones(3)  # made without device=: on the CPU
    sizes = torch.ones(K, device=cuda)
    with pytest.raises(RuntimeError, match="same device"):  # what RunLog.regroup did before the fix
        torch.quantile(sizes, torch.tensor([0.0, 0.5, 1.0]))


def test_forward_under_bf16_autocast_and_grouping_step(model, cuda):
    model = model.to(cuda)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(crops(cuda))
    assert out.z.shape == (4, B, D) and out.e.shape == (2, B, D)
    assert {out.z.dtype, out.p.dtype, out.e.dtype} == {torch.bfloat16} and out.e.device == cuda
    assert {p.dtype for p in model.momentum.parameters()} == {torch.float32}
    groups = GroupBank(K, D).to(cuda).groups
    result = grouping_step(out, groups, beta=0.99, tau=0.1)
    assert result.loss.dtype == result.new_groups.dtype == result.stats.sums.dtype == torch.float32
    assert result.stats.counts.shape == (K,) and result.cache_feats.shape == (2 * B, D)
    assert result.health.shape == (2,) and result.health.dtype == torch.float32  # agreement, hit rate
    assert {t.device for t in (*result[:2], *result.stats[:2], *result[3:])} == {cuda}
    assert step_flags(result.ok, stop_signal=False, skipped_samples=3).shape == (3,)


def test_byol_step_under_bf16_autocast_commits_no_groups(model, cuda):
    """The BYOL control's loss on the device in bf16; its step adds no statistics, so the commit leaves G and
    the cache alone."""
    model = model.to(cuda)
    bank, cache = GroupBank(K, D).to(cuda), FeatureCache(32, D).to(cuda)
    accumulator = StepAccumulator(cuda)
    accumulator.start(model.buffers())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        result = byol_step(model(crops(cuda)))
    assert result.loss.dtype == torch.float32 and result.loss.device == result.ok.device == cuda
    accumulator.add(result.loss, False)
    assert accumulator.stats is None and accumulator.mean_loss().device == cuda
    accumulator.commit(bank, cache, beta=0.99)
    assert bank.groups.device == cache.feats.device == cuda


def test_instance_warmup_step_under_bf16_autocast_commits_g_unchanged(model, cuda):
    """The instance warm-up's NT-Xent on the device in bf16 (docs/method.md "Instance warm-up"): float32 loss,
    statistics without members, so the commit keeps G's rows on the device; the cache takes the momentum rows."""
    model = model.to(cuda)
    bank, cache = GroupBank(K, D).to(cuda), FeatureCache(32, D).to(cuda)
    accumulator = StepAccumulator(cuda)
    accumulator.start(model.buffers())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(crops(cuda))
    result = instance_warmup_step(out, bank.groups, tau=0.2)
    assert result.loss.dtype == result.new_groups.dtype == torch.float32 and result.health.shape == (2,)
    assert result.stats.counts.shape == (K,) and result.cache_feats.shape == (2 * B, D)
    assert {t.device for t in (*result[:2], *result.stats[:2], *result[3:])} == {cuda}
    accumulator.add(result.loss, False, result.stats, (result.cache_feats, torch.arange(2 * B, device=cuda)),
                    result.health)
    accumulator.commit(bank, cache, beta=0.99)
    assert bank.groups.device == cache.feats.device == cuda


def test_deepspeed_precision_forward_and_ema(model, cuda):
    """As DeepSpeed leaves the model: every parameter in bf16, no autocast; ``settle_dtypes`` puts the
    momentum encoder back in float32 and it computes under CUDA autocast inside ``forward``."""
    model = model.to(cuda)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)  # DeepSpeed's _cast_module_mixed_precision
    model.settle_dtypes()
    out = model(crops(cuda))
    assert out.z.dtype == out.e.dtype == torch.bfloat16
    model.update_momentum(0.999)
    model.reset_momentum()
    assert {t.dtype for t in model.momentum.state_dict().values() if t.is_floating_point()} == {torch.float32}
    assert {t.dtype for t in model.online.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    assert {t.device for t in model.state_dict().values()} == {cuda}


def test_step_commit_discard_cache_and_ema(model, cuda):
    model = model.to(cuda)
    bank, cache = GroupBank(K, D).to(cuda), FeatureCache(32, D).to(cuda)
    accumulator = StepAccumulator(cuda)
    for skipped in (True, False):
        accumulator.start(model.buffers())
        for _ in range(2):  # two micro-batches against the same G
            result = grouping_step(model(crops(cuda)), bank.groups, beta=0.99, tau=0.1)
            ids = torch.arange(2 * B, device=cuda)
            accumulator.add(result.loss, False, result.stats, (result.cache_feats, ids), result.health)
        metrics = {"loss": accumulator.mean_loss(), "health": accumulator.mean_health(),
                   **assignment_health(accumulator.stats.counts)}
        if skipped:
            accumulator.discard()
        else:
            accumulator.commit(bank, cache, beta=0.99)
            model.update_momentum(0.99)
    assert {t.device for t in metrics.values()} == {cuda}
    assert bank.groups.device == cache.feats.device == cache.ptr.device == cuda
    bank.set(torch.randn(K, D, device=cuda))
    model.reset_momentum()
    feats, ids = cache.newest(4 * B)
    assert feats.shape == (4 * B, D) and feats.device == ids.device == cuda


def test_regroup_statistics_and_kmeans_device_math(cuda):
    """k-means' helpers between its host reads (the union's row count, the convergence test): the
    nearest-centroid search, greedy seeding, sampling, empty-cluster re-seeding; then the logged sizes and
    the cached rows' groups under the old and the new G that the label churn matches (on the host)."""
    x = F.normalize(torch.randn(64, D, device=cuda), dim=1)
    sample = kmeans_seeding.sample_union(x, 32, 64, seed=0, sync=False)
    search = NearestCentroid(x)
    # fit draws with CUDA generators; one cannot be made without a driver, and fake CUDA accepts this one
    generator = torch.Generator().manual_seed(0)
    sums, counts = kmeans_seeding.sample_cells(x, 32, 64, 0, search, generator, sync=False)
    centroids = kmeans_seeding.greedy_kmeanspp(sums, counts, K, trials=4, generator=generator)
    sims, labels = search(centroids)
    cost = torch.zeros(K, device=cuda).index_add_(0, labels, 1 - sims)
    seeds = kmeans._reseed_rows(x, sims, labels, cost, count=2, sync=False)
    sizes = torch.zeros(K, dtype=torch.long, device=cuda).index_add_(0, labels, torch.ones_like(labels))
    stats = cluster_size_health(sizes)
    assert stats["quantiles"].shape == (5,)
    old_and_new = torch.stack([assign(GroupBank(K, D).to(cuda).groups, x), assign(centroids, x)], dim=1)
    assert old_and_new.shape == (64, 2)
    assert {t.device for t in (sample, sums, counts, centroids, sims, labels, seeds, old_and_new,
                               *stats.values())} == {cuda}
