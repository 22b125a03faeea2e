"""Partition methods: equal sizes, optimality of the balanced assignment (against scipy's exact
Hungarian method and at full scale), planted clusters."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from test_moe import random_ffn

from densetomoe import surgery
from densetomoe.ffn import expert_members
from densetomoe.stages import partition
from densetomoe.stages.calibrate import LayerStats
from densetomoe.stages.partition import PARTITIONS, balanced_assign, balanced_kmeans


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
    for j, other in itertools.combinations(range(k), 2):  # no swap between two clusters gains
        assert loss[labels == j, other].min() + loss[labels == other, j].min() >= -1e-9


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


def _with_massive_neurons(massive: list[int], d_ff: int = 24, hidden: int = 16):
    """A gated FFN, and calibration inputs, where the ``massive`` neurons alone fire on one token (the
    last), hundreds of times a usual token's output: a first token's outliers, as in SmolLM2's layer 11."""
    ffn = random_ffn(hidden=hidden, d_ff=d_ff, gated=True, bias=False)
    u = torch.zeros(hidden)
    u[0] = 1.0
    others = [j for j in range(d_ff) if j not in massive]
    for w in (ffn.w_gate, ffn.w_up):
        w[others, 0] = 0.0  # the others never see the outlier direction
        w[massive] = 2.0 * u
    x = torch.randn(300, hidden, generator=torch.Generator().manual_seed(1))
    x[:, 0] = 0.0
    return ffn, torch.cat([x, 50.0 * u[None]])


def test_peak_contributions_are_each_neurons_largest_output_against_the_median_token():
    ffn, x = _with_massive_neurons([3, 17])
    a = ffn.neurons(x)
    outputs = a[:, :, None] * ffn.w_down.T[None]  # (tokens, d_ff, hidden): each neuron's output
    expected = outputs.norm(dim=-1).amax(0) / (a @ ffn.w_down.T).norm(dim=-1).median()
    peaks = ffn.peak_contributions(x)
    torch.testing.assert_close(peaks, expected, rtol=1e-4, atol=1e-6)
    assert sorted(int(j) for j in (peaks > surgery.MASSIVE).nonzero()) == [3, 17]


def test_massive_neurons_split_by_the_partition_are_brought_into_one_expert():
    ffn, x = _with_massive_neurons([3, 17])
    labels = torch.arange(24) % 8  # 3 and 17 in experts 3 and 1
    grouped = surgery.group_massive(labels, ffn.peak_contributions(x), 8)
    assert grouped[3] == grouped[17]
    assert torch.bincount(grouped, minlength=8).tolist() == [3] * 8
    assert int((grouped != labels).sum()) == 2  # one swap: the rest stays where the partition put it


def test_more_massive_neurons_than_an_expert_holds_fill_as_few_experts_as_they_need():
    peaks = torch.ones(24)
    peaks[[0, 5, 9, 14, 22]] = torch.tensor([900.0, 800.0, 700.0, 600.0, 500.0])
    labels = torch.arange(24) % 8
    grouped = surgery.group_massive(labels, peaks, 8)
    assert len({int(grouped[j]) for j in (0, 5, 9)}) == 1 and len({int(grouped[j]) for j in (14, 22)}) == 1
    assert grouped[0] != grouped[14]
    assert torch.bincount(grouped, minlength=8).tolist() == [3] * 8
    assert torch.equal(surgery.group_massive(labels, torch.ones(24), 8), labels)  # none massive: unchanged


def test_conversion_groups_the_massive_neurons_whatever_the_partition():
    from densetomoe.layer import split_layer
    from densetomoe.recipe import Recipe
    from densetomoe.stages.router import RouterSettings

    ffn, x = _with_massive_neurons([3, 17])
    a = ffn.neurons(x)
    stats = LayerStats(inputs=x, tokens=len(x), mean_abs=a.abs().mean(0), fire_rate=(a > 0).float().mean(0))
    recipe = Recipe(model="unused", experts=8, partition="random", router="centroid")
    random = PARTITIONS["random"](ffn, stats, 8, torch.Generator().manual_seed(0))
    assert random[3] != random[17]  # the partition alone splits them
    split = split_layer(ffn, stats, recipe, "silu", RouterSettings(hidden=8, steps=1), torch.Generator().manual_seed(0))
    assert split.labels[3] == split.labels[17]
    assert torch.bincount(split.labels, minlength=8).tolist() == [3] * 8
