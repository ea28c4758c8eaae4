"""Epoch order and micro-batches: permutation, determinism, split invariance, padding cut."""

import numpy as np

from dpocache.stages.train.batching import epoch_order, micro_batches, padded_fraction


def lengths(n=500, seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice([20, 40, 80, 160, 320], size=n) + rng.integers(0, 20, size=n)


def test_every_example_once_and_deterministic():
    ls = lengths()
    a = epoch_order(ls, 32, seed=1, epoch=0)
    assert sorted(a.tolist()) == list(range(len(ls)))
    assert (a == epoch_order(ls, 32, seed=1, epoch=0)).all()
    assert (a != epoch_order(ls, 32, seed=1, epoch=1)).any()


def test_same_optimizer_batches_for_any_split():
    ls = lengths()
    order = epoch_order(ls, 16, seed=3, epoch=0)
    one = [set(b.tolist()) for b in micro_batches(order, 16)]
    # 2 ranks x batch 4 x accumulation 2 = 16 per optimizer step
    ranks = [list(micro_batches(order, 4, rank=r, world=2)) for r in range(2)]
    steps = []
    for k in range(0, len(ranks[0]) - 1, 2):
        steps.append(set(np.concatenate([ranks[r][k + j] for r in range(2) for j in range(2)]).tolist()))
    assert steps[: len(one) - 1] == one[:-1]


def test_grouping_cuts_padding_by_a_third():
    ls = lengths(2000)
    naive = padded_fraction(ls, micro_batches(epoch_order(ls, 8, 0, 0, group_by_length=False), 8))
    grouped = padded_fraction(ls, micro_batches(epoch_order(ls, 8, 0, 0, group_by_length=True), 8))
    assert grouped <= 0.7 * naive


def test_ranks_get_equal_counts_with_wraparound():
    order = np.arange(10)
    per_rank = [list(micro_batches(order, 3, rank=r, world=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    assert all(len(b) == 3 for r in per_rank for b in r)
