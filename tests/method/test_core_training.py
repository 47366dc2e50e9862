"""A short SMoG training loop of the core (no data pipeline, no trainer) on tiny synthetic images."""

import torch
import torch.nn.functional as F

from smog_scale.method.feature_cache import FeatureCache
from smog_scale.method.grouping import GroupBank
from smog_scale.method.health import assignment_health
from smog_scale.method.kmeans import kmeans
from smog_scale.method.objectives import grouping_step
from smog_scale.models.smog import SMoGModel


def synthetic_images(n: int, num_classes: int = 8, size: int = 32, seed: int = 0):
    """Class = (colour, shape) pattern on noise: a few hundred tiny images with learnable structure."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    palette = torch.rand(num_classes, 3, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = 0.3 * torch.rand(n, 3, size, size, generator=gen)
    for i, c in enumerate(labels.tolist()):
        cy, cx = torch.randint(8, size - 8, (2,), generator=gen).tolist()
        if c % 2:
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < 36
        else:
            mask = ((yy - cy).abs() < 6) & ((xx - cx).abs() < 6)
        images[i][:, mask] = palette[c].unsqueeze(1)
    return images, labels


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift (pad + crop), flip and brightness: a cheap stand-in for the multi-crop pipeline."""
    n, _, h, w = images.shape
    padded = F.pad(images, (4, 4, 4, 4), mode="reflect")
    dy, dx = torch.randint(0, 9, (2,), generator=gen).tolist()
    out = padded[:, :, dy:dy + h, dx:dx + w]
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return (out * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gen)) - 0.5) / 0.25


def test_core_loop_loss_falls_without_collapse():
    torch.manual_seed(0)
    images, _ = synthetic_images(256)
    model = SMoGModel("test_resnet", proj_hidden_dim=128, proj_dim=32, pred_hidden_dim=128)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    bank, cache = GroupBank(16, 32), FeatureCache(512, 32)
    gen = torch.Generator().manual_seed(1)
    losses, used = [], []
    for step in range(40):
        batch = images[torch.randperm(256, generator=gen)[:64]]
        views = torch.stack([augment(batch, gen), augment(batch, gen)])
        result = grouping_step(model([views]), bank.groups, beta=0.99, tau=0.1)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        model.update_momentum(0.99)
        bank.commit(result.new_groups, result.ok)
        cache.push(result.cache_feats, ok=result.ok)
        if step % 10 == 9:
            bank.set(kmeans(cache.contents()[0], 16))
            model.reset_momentum()
        losses.append(result.loss.item())
        used.append(int(assignment_health(result.stats.counts)["groups_used"]))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert all(torch.isfinite(torch.tensor(losses)))
    assert last < 0.8 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert min(used[-10:]) > 1, f"collapsed into one group: {used}"
