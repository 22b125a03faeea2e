"""Partition methods: equal sizes, optimality of the balanced assignment, planted clusters."""

from __future__ import annotations

import itertools

import pytest
import torch

from densetomoe.stages import partition
from densetomoe.stages.calibrate import LayerStats
from densetomoe.ffn import expert_members
from densetomoe.stages.partition import PARTITIONS, balanced_assign, balanced_kmeans
from test_moe import random_ffn


def test_balanced_assign_is_optimal_on_a_small_case():
    torch.manual_seed(0)
    similarity = torch.randn(6, 3)
    labels = balanced_assign(similarity)
    best = max(
        (p for p in itertools.product(range(3), repeat=6) if all(p.count(c) == 2 for c in range(3))),
        key=lambda p: sum(similarity[i, c] for i, c in enumerate(p)),
    )
    assert torch.bincount(labels).tolist() == [2, 2, 2]
    assert similarity[torch.arange(6), labels].sum() == pytest.approx(float(sum(similarity[i, c] for i, c in enumerate(best))))


def test_greedy_assignment_keeps_sizes_equal(monkeypatch):
    monkeypatch.setattr(partition, "EXACT_ASSIGNMENT_LIMIT", 10)
    labels = balanced_assign(torch.randn(64, 8))
    assert torch.bincount(labels, minlength=8).tolist() == [8] * 8


def test_balanced_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 32, generator=g) * 3
    truth = torch.arange(40) % 4
    features = centers[truth] + 0.1 * torch.randn(40, 32, generator=g)
    labels = balanced_kmeans(features, 4, torch.Generator().manual_seed(1))
    for c in range(4):  # every planted cluster lands in one expert
        assert labels[truth == c].unique().numel() == 1
    assert torch.bincount(labels).tolist() == [10] * 4


def test_coactivation_groups_neurons_that_fire_together():
    """Two planted groups of neurons fire on disjoint sets of tokens; the split must follow them."""
    ffn = random_ffn(hidden=8, d_ff=16)
    ffn.w_up.zero_()
    ffn.b_up.fill_(-5.0)
    ffn.w_up[:8, 0] = 4.0  # neurons 0-7 fire when feature 0 is on
    ffn.w_up[8:, 1] = 4.0  # neurons 8-15 when feature 1 is on
    x = torch.zeros(200, 8)
    x[:100, 0] = 2.0
    x[100:, 1] = 2.0
    stats = LayerStats(inputs=x, tokens=200, mean_abs=torch.zeros(16), fire_rate=torch.zeros(16))
    labels = PARTITIONS["coactivation"](ffn, stats, 2, torch.Generator().manual_seed(0))
    assert labels[:8].unique().numel() == 1 and labels[8:].unique().numel() == 1
    assert labels[0] != labels[8]


@pytest.mark.parametrize("method", sorted(PARTITIONS))
def test_every_method_gives_equal_experts(method):
    ffn = random_ffn(d_ff=48)
    stats = LayerStats(inputs=torch.randn(300, 16), tokens=300, mean_abs=torch.zeros(48), fire_rate=torch.zeros(48))
    labels = PARTITIONS[method](ffn, stats, 6, torch.Generator().manual_seed(0))
    assert torch.bincount(labels, minlength=6).tolist() == [8] * 6
    members = expert_members(labels, 6)
    assert sorted(members.flatten().tolist()) == list(range(48))


def test_random_partition_depends_on_seed():
    ffn = random_ffn(d_ff=48)
    a = PARTITIONS["random"](ffn, None, 4, torch.Generator().manual_seed(0))
    b = PARTITIONS["random"](ffn, None, 4, torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)
