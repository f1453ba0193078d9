import random

import pytest

import lmcycle.train.loop as loop
from lmcycle.errors import LmcycleError
from lmcycle.train.loop import grouped_batch_indices, micro_batch_indices


def skewed_lengths(n: int, seed: int = 0) -> list[int]:
    """Mostly short items and a long tail, like chat preference data."""
    rng = random.Random(seed)
    return [min(int(rng.lognormvariate(4.5, 0.8)), 1024) for _ in range(n)]


def stream(lengths, steps, batch_size, grad_accum, seed=0, group=50):
    return [i for s in range(steps) for mb in grouped_batch_indices(lengths, s, batch_size, grad_accum, seed, group)
            for i in mb]


@pytest.mark.parametrize(("n", "batch_size", "grad_accum"), [(120, 4, 2), (103, 4, 1), (37, 5, 3)])
def test_every_epoch_covers_each_item_exactly_once(n, batch_size, grad_accum):
    lengths = skewed_lengths(n)
    steps = 5 * n // (batch_size * grad_accum) + 1  # > 4 epochs, steps straddling epochs when n is not a multiple
    seen = stream(lengths, steps, batch_size, grad_accum, group=3)
    epochs = [seen[e * n:(e + 1) * n] for e in range(4)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1]


def mean_padding(lengths, batches) -> float:
    """Mean padded positions per row when each batch is padded to its own longest item."""
    pad = [max(lengths[i] for i in b) - lengths[i] for b in batches for i in b]
    return sum(pad) / len(pad)


@pytest.mark.parametrize("n", [400, 397])  # 397: steps straddle epochs, the grouping must survive that
def test_grouped_batches_pad_much_less_than_random_batches(n):
    lengths = skewed_lengths(n, seed=1)
    steps = range(3 * n // 8)  # three epochs of batch 8
    grouped = [grouped_batch_indices(lengths, s, 8, 1, seed=0, group=10)[0] for s in steps]
    plain = [micro_batch_indices(n, s, 8, 1, seed=0)[0] for s in steps]
    assert mean_padding(lengths, grouped) < 0.25 * mean_padding(lengths, plain)
    late = slice(2 * n // 8 + 1, None)  # the third epoch alone
    assert mean_padding(lengths, grouped[late]) < 0.25 * mean_padding(lengths, plain[late])


def test_grouped_batches_still_mix_lengths_across_steps():
    lengths = skewed_lengths(400, seed=2)
    longest = [max(lengths[i] for i in grouped_batch_indices(lengths, s, 8, 1, seed=0)[0]) for s in range(50)]
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)


def test_deterministic_in_step_and_seed():
    lengths = skewed_lengths(90)
    a = [grouped_batch_indices(lengths, s, 4, 2, seed=7) for s in (30, 3, 11)]
    loop._grouped_epoch_order.cache_clear()
    b = [grouped_batch_indices(lengths, s, 4, 2, seed=7) for s in (30, 3, 11)]
    assert a == b
    assert [grouped_batch_indices(lengths, s, 4, 2, seed=8) for s in (30, 3, 11)] != a


def test_group_of_one_gives_the_plain_shuffled_batches():
    lengths = skewed_lengths(53)
    for step in range(30):  # > 4 epochs of 53 items in steps of 8
        grouped = [i for mb in grouped_batch_indices(lengths, step, 4, 2, seed=3, group=1) for i in mb]
        plain = [i for mb in micro_batch_indices(53, step, 4, 2, seed=3) for i in mb]
        assert sorted(grouped) == sorted(plain)


def test_ranks_and_micro_batches_split_the_same_global_batch(monkeypatch):
    lengths = skewed_lengths(70)
    whole = grouped_batch_indices(lengths, 5, 8, 1, seed=1)[0]
    accum = grouped_batch_indices(lengths, 5, 4, 2, seed=1)
    assert [i for mb in accum for i in mb] == whole
    monkeypatch.setattr(loop, "world_size", lambda: 2)
    per_rank = []
    for r in (0, 1):
        monkeypatch.setattr(loop, "rank", lambda r=r: r)
        per_rank.append(grouped_batch_indices(lengths, 5, 2, 2, seed=1))
    assert sorted(i for mbs in per_rank for mb in mbs for i in mb) == sorted(whole)
    assert not set(i for mb in per_rank[0] for i in mb) & set(i for mb in per_rank[1] for i in mb)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(LmcycleError, match="no training data"):
        grouped_batch_indices([], 0, 2, 1, seed=0)
    with pytest.raises(LmcycleError, match="group must be at least 1"):
        grouped_batch_indices([3, 4], 0, 2, 1, seed=0, group=0)
