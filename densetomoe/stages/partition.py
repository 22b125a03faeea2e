"""Split an FFN layer's neurons into equal-sized experts.

Each method is a registry entry mapping one layer's weights and calibration statistics to
``labels`` (``(d_ff,)``, the expert of every neuron, each expert holding ``d_ff / experts``).
The math below is pure tensor code; calibration hooks and I/O live elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..ffn import DenseFFN
from ..registry import Registry
from .calibrate import LayerStats

# (layer's FFN, its calibration statistics, experts, generator) -> labels (d_ff,)
PartitionFn = Callable[[DenseFFN, LayerStats, int, torch.Generator], torch.Tensor]
PARTITIONS: Registry[PartitionFn] = Registry("partition method")

# Above this many neurons the exact balanced assignment (cubic time) gives way to a greedy one.
EXACT_ASSIGNMENT_LIMIT = 8192


def balanced_assign(similarity: torch.Tensor) -> torch.Tensor:
    """Labels maximising total ``similarity`` ``(n, k)`` with exactly ``n / k`` items per cluster.

    Exact: a linear assignment of items to ``n`` slots (each cluster repeated ``n / k`` times),
    solved with scipy's ``linear_sum_assignment``. Greedy beyond :data:`EXACT_ASSIGNMENT_LIMIT` items:
    pairs taken in order of decreasing similarity while their cluster has room.
    """
    n, k = similarity.shape
    capacity = n // k
    if n <= EXACT_ASSIGNMENT_LIMIT:
        cost = -np.repeat(similarity.double().numpy(), capacity, axis=1)  # (n, n)
        rows, slots = linear_sum_assignment(cost)
        labels = torch.empty(n, dtype=torch.long)
        labels[torch.from_numpy(rows)] = torch.from_numpy(slots // capacity)
        return labels
    labels = torch.full((n,), -1, dtype=torch.long)
    room = [capacity] * k
    for flat in similarity.flatten().argsort(descending=True).tolist():
        item, cluster = divmod(flat, k)
        if labels[item] < 0 and room[cluster] > 0:
            labels[item] = cluster
            room[cluster] -= 1
    return labels


def balanced_kmeans(features: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 12) -> torch.Tensor:
    """Spherical k-means with equal cluster sizes over the rows of ``features`` ``(n, f)``.

    Rows are unit-normalised, similarity is the cosine, and each assignment step is
    :func:`balanced_assign`; starts from ``k`` rows picked by k-means++ seeding.
    """
    x = torch.nn.functional.normalize(features.float(), dim=1)  # (n, f)
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x[first]]
    for _ in range(1, k):
        distance = (1 - (x @ torch.stack(centroids).T).max(dim=1).values).clamp_min(0)  # (n,)
        pick = int(torch.multinomial(distance + 1e-12, 1, generator=generator))
        centroids.append(x[pick])
    c = torch.stack(centroids)  # (k, f)
    labels = None
    for _ in range(iterations):
        new = balanced_assign(x @ c.T)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        members = torch.nn.functional.one_hot(labels, k).T.to(x.dtype)  # (k, n)
        c = torch.nn.functional.normalize(members @ x, dim=1)  # (k, f)
    return labels


@PARTITIONS.register("coactivation", "neurons that activate on the same calibration tokens share an expert (balanced k-means)")
def by_coactivation(ffn: DenseFFN, stats: LayerStats, experts: int, generator: torch.Generator) -> torch.Tensor:
    """Neurons that fire together share an expert (MoEfication, Zhang et al. 2022, co-activation split).

    A neuron's feature is its activation magnitude over the sampled calibration tokens; balanced
    spherical k-means groups neurons whose large activations fall on the same tokens, so a token's
    activation mass concentrates in few experts.
    """
    activations = ffn.neurons(stats.inputs).abs()  # (samples, d_ff)
    return balanced_kmeans(activations.T, experts, generator)


@PARTITIONS.register("parameters", "neurons with similar input weights share an expert (balanced k-means on weight rows)")
def by_parameters(ffn: DenseFFN, stats: LayerStats, experts: int, generator: torch.Generator) -> torch.Tensor:
    """Neurons with similar input weights share an expert (MoEfication's parameter clustering split)."""
    rows = ffn.w_up if ffn.w_gate is None else torch.cat([ffn.w_gate, ffn.w_up], dim=1)  # (d_ff, hidden[*2])
    return balanced_kmeans(rows, experts, generator)


@PARTITIONS.register("random", "neurons assigned to experts at random (baseline)")
def at_random(ffn: DenseFFN, stats: LayerStats, experts: int, generator: torch.Generator) -> torch.Tensor:
    """A random equal split: the baseline that any real method must beat."""
    order = torch.randperm(ffn.size, generator=generator)
    labels = torch.empty(ffn.size, dtype=torch.long)
    labels[order] = torch.arange(ffn.size) % experts
    return labels
