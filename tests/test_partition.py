"""Partition methods: equal sizes, optimality of the balanced assignment (against scipy's exact
Hungarian method and at full scale), planted clusters."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

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


def _instance(kind: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, k, generator=g)
    if kind == "ties":  # three distinct values: many optimal assignments
        return torch.randint(0, 3, (n, k), generator=g).float()
    x = torch.nn.functional.normalize(torch.rand(n, 32, generator=g), dim=1)  # cosines, as k-means sees them
    return x @ torch.nn.functional.normalize(torch.rand(k, 32, generator=g), dim=1).T


def _total(similarity: torch.Tensor, labels: torch.Tensor) -> float:
    return similarity.double()[torch.arange(len(labels)), labels].sum().item()


def _scipy_optimum(similarity: torch.Tensor) -> float:
    """The exact optimum by scipy's Hungarian method on the n x n matrix (each cluster n / k slots)."""
    n, k = similarity.shape
    cost = -np.repeat(similarity.double().numpy(), n // k, axis=1)  # (n, n)
    rows, slots = linear_sum_assignment(cost)
    return -cost[rows, slots].sum()


@pytest.mark.parametrize("kind", ["gaussian", "ties", "cosine"])
@pytest.mark.parametrize("n,k", [(256, 8), (1536, 8), (96, 16)])
def test_balanced_assign_matches_the_exact_hungarian_optimum(n, k, kind):
    similarity = _instance(kind, n, k)
    labels = balanced_assign(similarity)
    assert labels.dtype == torch.long and labels.shape == (n,)
    assert torch.bincount(labels, minlength=k).tolist() == [n // k] * k
    assert _total(similarity, labels) == pytest.approx(_scipy_optimum(similarity), rel=0, abs=1e-6)
    assert torch.equal(labels, balanced_assign(similarity))  # deterministic


def test_auction_alone_is_within_n_eps_of_the_optimum():
    """Without its greedy tail, the auction ends in eps-complementary slackness: within n * eps."""
    similarity = _instance("gaussian", 256, 8)
    benefit = similarity.double()
    eps = 1e-3 * (benefit.max() - benefit.min()).item()
    labels = partition.auction_assign(benefit, final_eps=1e-3, tail=0)
    assert torch.bincount(labels, minlength=8).tolist() == [32] * 8
    assert _scipy_optimum(similarity) - _total(similarity, labels) <= 256 * eps


def test_cancelling_exchange_cycles_alone_reaches_the_optimum():
    similarity = _instance("cosine", 96, 16)
    start = torch.arange(96) % 16  # balanced, far from optimal
    labels = partition.cancel_exchange_cycles(similarity.double(), start)
    assert torch.bincount(labels, minlength=16).tolist() == [6] * 16
    assert _total(similarity, labels) == pytest.approx(_scipy_optimum(similarity), rel=0, abs=1e-9)
    assert _total(similarity, start) < _total(similarity, labels) - 0.1


def test_two_clusters_split_at_the_median_margin_at_full_scale():
    """With k = 2 the optimum is known at any n: the half of the items that gain most from cluster 0."""
    n = 28672  # LLaMA-70B's d_ff
    similarity = _instance("cosine", n, 2)
    labels = balanced_assign(similarity)
    first = (similarity[:, 0] - similarity[:, 1]).argsort(descending=True)[: n // 2]
    expected = torch.ones(n, dtype=torch.long)
    expected[first] = 0
    assert _total(similarity, labels) == pytest.approx(_total(similarity, expected), rel=0, abs=1e-6)


def test_full_scale_assignment_is_balanced_and_no_swap_gains():
    n, k = 28672, 16
    similarity = _instance("cosine", n, k)
    labels = balanced_assign(similarity)
    assert torch.bincount(labels, minlength=k).tolist() == [n // k] * k
    s = similarity.double()
    loss = s[torch.arange(n), labels][:, None] - s  # (n, k): what moving each item to each cluster costs
    for j, l in itertools.combinations(range(k), 2):  # no swap between two clusters gains
        assert loss[labels == j, l].min() + loss[labels == l, j].min() >= -1e-9


def test_assignment_allocates_nothing_n_by_n():
    n, k = 14336, 16  # LLaMA-3-8B's d_ff
    similarity = _instance("cosine", n, k)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        labels = balanced_assign(similarity)
    largest = max(event.cpu_memory_usage for event in profile.events())  # bytes, the largest single op's
    assert largest <= 4 * n * k * 8  # a few (n, k) float64 tensors; an n x n byte matrix would be 205 MB
    assert torch.bincount(labels, minlength=k).tolist() == [n // k] * k


def test_balanced_assign_refuses_unequal_clusters():
    with pytest.raises(ValueError, match="do not split into 3 equal clusters"):
        balanced_assign(torch.randn(10, 3))


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
