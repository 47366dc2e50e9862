import math

import pytest

from smog_scale.method import schedules


def test_ema_momentum_cosine_from_start_to_one():
    assert schedules.ema_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert schedules.ema_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert schedules.ema_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert schedules.ema_momentum(150, 100, 0.99) == pytest.approx(1.0)


def test_beta_linear_from_one_to_099():
    assert schedules.group_beta(0, 200) == pytest.approx(1.0)
    assert schedules.group_beta(100, 200) == pytest.approx(0.995)
    assert schedules.group_beta(200, 200) == pytest.approx(0.99)


def test_learning_rate_warmup_then_cosine():
    peak, warm, total = 2.0, 10, 110
    assert schedules.learning_rate(0, total, peak, warm) == pytest.approx(0.2)
    assert schedules.learning_rate(9, total, peak, warm) == pytest.approx(2.0)
    assert schedules.learning_rate(10, total, peak, warm) == pytest.approx(2.0)
    assert schedules.learning_rate(60, total, peak, warm) == pytest.approx(1.0)
    assert schedules.learning_rate(110, total, peak, warm, final=0.1) == pytest.approx(0.1)
    values = [schedules.learning_rate(s, total, peak, warm) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_midpoint():
    assert schedules.cosine(25, 100, 1.0, 0.0) == pytest.approx(0.5 + 0.5 * math.cos(math.pi / 4))


def test_beta_fixed_schedule_stays_at_its_end_value():
    assert [schedules.group_beta(s, 200, 1.0, 0.99, "fixed") for s in (0, 100, 200)] == [0.99] * 3
    with pytest.raises(ValueError, match="'linear' or 'fixed'"):
        schedules.group_beta(0, 200, schedule="cosine")
