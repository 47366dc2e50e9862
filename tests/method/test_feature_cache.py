import pytest
import torch

from smog_scale.method.feature_cache import FeatureCache


def test_fills_then_wraps_keeping_the_last_pushed_rows():
    cache = FeatureCache(capacity=10, dim=2)
    pushed = []
    for step in range(7):  # 7 pushes of 3 rows: wraps twice
        feats = torch.arange(step * 3, step * 3 + 3, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
        ids = torch.arange(step * 3, step * 3 + 3)
        cache.push(feats, ids)
        pushed.extend(ids.tolist())
        feats_out, ids_out = cache.contents()
        assert ids_out.tolist() == pushed[-10:]
        assert torch.equal(feats_out[:, 0].long(), ids_out)
    assert int(cache.filled) == 10 and int(cache.ptr) == 21 % 10


def test_batch_larger_than_capacity_keeps_its_tail():
    cache = FeatureCache(capacity=4, dim=1)
    cache.push(torch.arange(6.0).unsqueeze(1), torch.arange(6))
    assert cache.contents()[1].tolist() == [2, 3, 4, 5]


def test_not_ok_push_changes_nothing():
    cache = FeatureCache(capacity=5, dim=3)
    cache.push(torch.ones(2, 3), torch.tensor([1, 2]))
    state = {k: v.clone() for k, v in cache.state_dict().items()}
    cache.push(torch.full((2, 3), float("nan")), torch.tensor([3, 4]), ok=torch.tensor(False))
    for k, v in cache.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_state_dict_round_trip_and_bad_input():
    cache = FeatureCache(capacity=3, dim=2)
    cache.push(torch.randn(4, 2), torch.arange(4))
    other = FeatureCache(capacity=3, dim=2)
    other.load_state_dict(cache.state_dict())
    assert torch.equal(other.contents()[0], cache.contents()[0])
    with pytest.raises(ValueError, match="dimension 2"):
        cache.push(torch.randn(1, 5))
    with pytest.raises(ValueError, match="positive"):
        FeatureCache(0, 2)
