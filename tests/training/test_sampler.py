"""Length-grouped batch order: little padding, an ordinary batch first and the longest second, no long-first bias."""

import random

from loraforge.training.trainer import length_grouped_order


def test_groups_are_a_seeded_permutation_with_the_longest_second():
    rng = random.Random(0)
    lengths = [rng.randint(5, 400) for _ in range(800)]
    order = length_grouped_order(lengths, 8, seed=3)
    assert sorted(order) == list(range(800))
    assert order == length_grouped_order(lengths, 8, seed=3) != length_grouped_order(lengths, 8, seed=4)
    orders = [length_grouped_order(lengths, 8, seed) for seed in range(40)]
    assert all(max(lengths) in [lengths[i] for i in o[8:16]] for o in orders), "memory peaks at step 2"
    first_mean = sum(lengths[i] for o in orders for i in o[:8]) / (40 * 8)
    mean_all = sum(lengths) / len(lengths)
    assert abs(first_mean - mean_all) < 0.15 * mean_all, "the first step is an ordinary one, not the slowest"


def test_a_partial_epoch_sees_ordinary_lengths_and_little_padding():
    rng = random.Random(1)
    lengths = [rng.randint(5, 400) for _ in range(1600)]
    order = length_grouped_order(lengths, 8, seed=0)
    first_quarter = [lengths[i] for i in order[8:400]]
    mean_all = sum(lengths) / len(lengths)
    assert abs(sum(first_quarter) / len(first_quarter) - mean_all) < 0.15 * mean_all, "not the longest first"
    batches = [[lengths[i] for i in order[k : k + 8]] for k in range(0, 1600, 8)]
    padded = sum(8 * max(b) for b in batches)
    assert padded < 1.15 * sum(lengths), "grouping keeps padding small"
