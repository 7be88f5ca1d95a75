"""StratifiedBatchSampler: batch size, class coverage and proportions, seeds, long tails, shards."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from guided_nc.sampler import StratifiedBatchSampler


def long_tail_labels(sizes):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(0).permutation(labels)


def class_counts(labels, batch, num_classes):
    return np.bincount(labels[np.asarray(batch)], minlength=num_classes)


@pytest.mark.parametrize("drop_last", [True, False])
def test_exact_batch_size_and_length(drop_last):
    labels = long_tail_labels([30, 20, 13])  # N = 63
    sampler = StratifiedBatchSampler(labels, batch_size=8, drop_last=drop_last)
    batches = list(sampler)
    assert len(sampler) == len(batches) == (7 if drop_last else 8)
    assert all(len(batch) == 8 for batch in batches)
    assert all(0 <= i < 63 for batch in batches for i in batch)
    assert all(isinstance(i, int) for i in batches[0])


def test_balanced_epoch_is_a_permutation_with_every_class_in_every_batch():
    labels = np.arange(60) % 4  # 15 per class, B = 12: 3 per class per batch
    sampler = StratifiedBatchSampler(labels, batch_size=12, seed=3)
    batches = list(sampler)
    assert len(batches) == 5
    for batch in batches:
        assert class_counts(labels, batch, 4).tolist() == [3, 3, 3, 3]
    assert sorted(i for batch in batches for i in batch) == list(range(60))


@pytest.mark.parametrize("seed", [0, 1])
def test_long_tail_coverage_and_proportions(seed):
    sizes = np.array([300, 200, 80, 15, 5])
    labels = long_tail_labels(sizes)
    batch_size = 50
    sampler = StratifiedBatchSampler(labels, batch_size, seed=seed)
    batches = list(sampler)
    counts = np.array([class_counts(labels, b, 5) for b in batches])
    share = batch_size * sizes / sizes.sum()  # [25, 16.7, 6.7, 1.25, 0.42]
    floors = np.maximum(1, np.floor(share))  # [25, 16, 6, 1, 1]: 49 slots, 1 shared
    assert (counts.sum(axis=1) == batch_size).all()
    assert (counts >= 1).all()  # every class in every batch
    assert ((counts == floors) | (counts == floors + 1)).all()
    assert (counts[:, 0] == 25).all() and (counts[:, 4] == 1).all()  # no remainder to share
    # The 5-sample class is drawn 12 times: all its samples are used, and cycled.
    drawn = [i for batch in batches for i in batch if labels[i] == 4]
    assert len(drawn) == len(batches) == 12
    assert set(drawn) == set(np.flatnonzero(labels == 4))


def test_minimum_one_slot_trims_largest_class():
    sizes = [1000] + [1] * 9  # shares: 11.9 and nine of 0.012 -> 11 + 9 > 12 slots
    labels = long_tail_labels(sizes)
    sampler = StratifiedBatchSampler(labels, batch_size=12, seed=0)
    for batch in list(sampler)[:20]:
        counts = class_counts(labels, batch, 10)
        assert counts.tolist() == [3] + [1] * 9


def test_remaining_slots_are_proportional_on_average():
    sizes = np.array([50, 30, 20])  # B = 7: shares 3.5, 2.1, 1.4 -> floors 3, 2, 1, one extra slot
    labels = long_tail_labels(sizes)
    sampler = StratifiedBatchSampler(labels, batch_size=7, seed=0)
    totals = np.zeros(3)
    epochs = 40
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in sampler:
            totals += class_counts(labels, batch, 3)
    mean = totals / (epochs * len(sampler))
    # Expected 3.5, 2.1, 1.4; the extra slot is a Bernoulli draw: standard error < 0.03.
    np.testing.assert_allclose(mean, 7 * sizes / sizes.sum(), atol=0.1)


def test_more_classes_than_batch_size_rotates_classes():
    num_classes, batch_size = 10, 4
    labels = np.arange(200) % num_classes
    sampler = StratifiedBatchSampler(labels, batch_size, seed=2)
    assert sampler.batches_per_cycle == 3
    batches = list(sampler)
    assert len(batches) == 50 and all(len(b) == batch_size for b in batches)
    for start in range(0, len(batches) - 2, 3):  # every cycle of 3 consecutive batches
        window = np.concatenate([labels[b] for b in batches[start : start + 3]])
        assert set(window.tolist()) == set(range(num_classes))
    totals = np.bincount(labels[np.concatenate(batches)], minlength=num_classes)
    assert totals.min() >= 16 and totals.max() <= 24  # 200 draws shared by 10 classes (20 each)


def test_reproducible_from_seed_and_epoch():
    labels = long_tail_labels([40, 25, 9])
    first = StratifiedBatchSampler(labels, 6, seed=5)
    second = StratifiedBatchSampler(labels, 6, seed=5)
    assert list(first) == list(second)
    assert list(first) == list(first)  # iterating again does not advance anything
    epoch0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch0
    assert list(StratifiedBatchSampler(labels, 6, seed=6)) != epoch0
    # state_dict round trip selects the same epoch in a new sampler.
    state = first.state_dict()
    assert state == {"epoch": 1, "seed": 5}
    resumed = StratifiedBatchSampler(labels, 6, seed=5)
    resumed.load_state_dict(state)
    assert list(resumed) == list(first)


@pytest.mark.parametrize("num_replicas", [2, 4])
def test_shards_partition_the_global_batch(num_replicas):
    labels = long_tail_labels([30, 17, 9, 4])
    batch_size = 8
    reference = StratifiedBatchSampler(labels, batch_size, seed=9)
    shards = [
        list(StratifiedBatchSampler(labels, batch_size, seed=9, num_replicas=num_replicas, rank=r))
        for r in range(num_replicas)
    ]
    assert all(len(shard) == len(reference) for shard in shards)
    for step, global_batch in enumerate(reference):
        pieces = [shard[step] for shard in shards]
        assert all(len(piece) == batch_size // num_replicas for piece in pieces)
        assert sorted(itertools.chain.from_iterable(pieces)) == sorted(global_batch)
        interleaved = [piece[j] for j in range(batch_size // num_replicas) for piece in pieces]
        assert interleaved == global_batch  # rank r holds positions r, r + R, ...


def test_works_with_dataloader_and_tensor_labels():
    labels = torch.arange(30) % 3
    dataset = TensorDataset(torch.arange(30), labels)
    sampler = StratifiedBatchSampler(labels, batch_size=6, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler)
    seen = [(idx, lab) for idx, lab in loader]
    assert len(seen) == 5
    for indices, batch_labels in seen:
        assert len(indices) == 6 and torch.bincount(batch_labels).tolist() == [2, 2, 2]


def test_non_contiguous_class_ids():
    labels = np.array([5, 2, 9] * 10)
    sampler = StratifiedBatchSampler(labels, batch_size=3)
    for batch in sampler:
        assert sorted(labels[batch].tolist()) == [2, 5, 9]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"batch_size": 6, "num_replicas": 4},
            ValueError,
            "batch_size=6 is not divisible by num_replicas=4",
        ),
        (
            {"batch_size": 4, "num_replicas": 2, "rank": 2},
            ValueError,
            "rank=2 must be < num_replicas=2",
        ),
        ({"batch_size": 31}, ValueError, "batch_size=31 exceeds the number of samples 30"),
        ({"batch_size": 0}, ValueError, "batch_size=0 must be >= 1"),
        ({"batch_size": 4.0}, TypeError, "batch_size must be an int"),
        ({"batch_size": 4, "seed": -1}, ValueError, "seed=-1 must be >= 0"),
        ({"labels": np.arange(30) * 0.5, "batch_size": 4}, TypeError, "labels must be integers"),
        ({"labels": np.zeros((5, 6), dtype=int), "batch_size": 4}, ValueError, "1-D sequence"),
        ({"labels": np.array([0, -1] * 15), "batch_size": 4}, ValueError, "labels must be >= 0"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    arguments = {"labels": np.arange(30) % 3, **kwargs}
    with pytest.raises(error, match=match):
        StratifiedBatchSampler(**arguments)


def test_state_errors():
    sampler = StratifiedBatchSampler(np.arange(30) % 3, 6, seed=1)
    with pytest.raises(ValueError, match=r"seed=2 differs"):
        sampler.load_state_dict({"epoch": 3, "seed": 2})
    with pytest.raises(ValueError, match=r"missing \['seed'\]"):
        sampler.load_state_dict({"epoch": 3})
    with pytest.raises(ValueError, match=r"epoch=-1 must be >= 0"):
        sampler.set_epoch(-1)
    assert sampler.epoch == 0
    assert math.isclose(sum(sampler._arcs), 6)
