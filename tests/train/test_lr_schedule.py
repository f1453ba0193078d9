import math

import pytest

from lmcycle.train.schedule import lr_at


def test_warmup_rises_linearly_to_the_peak():
    lrs = [lr_at(s, lr=1.0, max_steps=100, warmup_steps=10) for s in range(10)]
    steps = [b - a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert all(s == pytest.approx(steps[0]) for s in steps)  # constant increments
    assert lrs[0] > 0  # no step is wasted at lr 0
    assert lr_at(10, lr=1.0, max_steps=100, warmup_steps=10) == pytest.approx(1.0)


def test_cosine_decays_monotonically_to_the_minimum_at_the_last_step():
    kw = dict(lr=2.0, max_steps=50, warmup_steps=5, min_lr_ratio=0.1)
    lrs = [lr_at(s, **kw) for s in range(5, 50)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[0] == pytest.approx(2.0)
    assert lrs[-1] == pytest.approx(0.2)
    assert min(lrs) >= 0.2 - 1e-12


def test_cosine_midpoint_is_halfway_between_peak_and_minimum():
    # 0 warmup, 101 steps: the decay spans steps 0..100, so step 50 is the cosine's midpoint (cos(pi/2) = 0).
    assert lr_at(50, lr=1.0, max_steps=101, min_lr_ratio=0.2) == pytest.approx((1.0 + 0.2) / 2)
    quarter = lr_at(25, lr=1.0, max_steps=101, min_lr_ratio=0.0)
    assert quarter == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_min_lr_ratio_one_is_a_constant_schedule():
    assert [lr_at(s, lr=0.3, max_steps=20, min_lr_ratio=1.0) for s in range(20)] == pytest.approx([0.3] * 20)
