"""Split an FFN layer's neurons into equal-sized experts.

Each method is a registry entry mapping one layer's weights and calibration statistics to
``labels`` (``(d_ff,)``, the expert of every neuron, each expert holding ``d_ff / experts``).
The math below is pure tensor code; calibration hooks and I/O live elsewhere.

The clustering methods run balanced k-means, whose assignment step (:func:`balanced_assign`) is an
exact transportation problem: ``n`` neurons, ``k`` experts of ``n / k`` each. It is solved on the
``(n, k)`` similarity itself, never an ``n x n`` cost matrix: an auction with eps-scaling places
the neurons (Bertsekas & Castanon 1989), and cancelling negative cycles of single moves between
experts makes the result exactly optimal (Klein 1967). Memory is ``O(n k)``, and so is each auction
round and each cancelled cycle (plus a sort of ``n`` prices): a 28,672-neuron layer's assignment into
16 experts takes well under a second, where the former ``n x n`` Hungarian method was cubic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ..ffn import DenseFFN
from ..registry import Registry
from .calibrate import LayerStats

# (layer's FFN, its calibration statistics, experts, generator) -> labels (d_ff,)
PartitionFn = Callable[[DenseFFN, LayerStats, int, torch.Generator], torch.Tensor]
PARTITIONS: Registry[PartitionFn] = Registry("partition method")


def balanced_assign(similarity: torch.Tensor) -> torch.Tensor:
    """Labels maximising total ``similarity`` ``(n, k)`` with exactly ``n / k`` items per cluster.

    Exact (to ``1e-9`` of the similarity's range per exchange cycle) in ``O(n k)`` memory: an auction
    (:func:`auction_assign`) gives a balanced assignment close to the optimum, then
    :func:`cancel_exchange_cycles` moves items around cycles of clusters until no cycle gains.
    Deterministic: ties go the same way on every run.
    """
    n, k = similarity.shape
    if n % k:
        raise ValueError(f"{n} items do not split into {k} equal clusters: use a cluster count that divides {n}")
    if k == 1:
        return torch.zeros(n, dtype=torch.long, device=similarity.device)
    # (n, k) on the CPU: thousands of small steps, each waiting on the last, are no work for an accelerator;
    # differences of float32 inputs are exact in float64
    benefit = similarity.double().cpu()
    with _one_thread(), torch.device("cpu"):
        return cancel_exchange_cycles(benefit, auction_assign(benefit)).to(similarity.device)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block. The assignment makes thousands of small ops on
    ``(n, k)`` tensors: a second thread gains nothing there, and on a busy machine each parallel op
    waits milliseconds for a free core (30x slower in all on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def auction_assign(
    benefit: torch.Tensor, theta: float = 8.0, final_eps: float = 1e-6, tail: int | None = None
) -> torch.Tensor:
    """A balanced assignment within about ``n * eps`` of the optimum: the auction algorithm for the
    transportation problem (Bertsekas & Castanon 1989, "The auction algorithm for the transportation
    problem"), Jacobi version with eps-scaling.

    Cluster ``j`` is ``m = n / k`` slots, each with a price; its price ``p_j`` is its cheapest slot's.
    In each round every unassigned item ``i`` bids for its best cluster ``j = argmax_l s_il - p_l``,
    raising the price of the slot it takes to ``s_ij - w_i + eps``, where ``w_i`` is the item's value
    ``max_{l != j} s_il - p_l`` elsewhere; a cluster keeps the ``m`` highest of its slot prices and the
    new bids, and evicts the items it no longer holds. Every held item then satisfies eps-complementary
    slackness, ``s_ij - p_j >= max_l (s_il - p_l) - eps``, which puts the assignment within ``n * eps``
    of the optimum. ``eps`` starts at a quarter of the benefits' range and shrinks ``theta``-fold per
    phase down to ``final_eps`` times that range; a new phase keeps the prices and frees only the items
    that break the tighter slackness (their slots fall to their cluster's price).

    A phase stops once at most ``tail`` items are unassigned (default: ``max(k, n / 256)``): the
    last few start chains of evictions that raise prices ``eps`` at a time across thousands of rounds.
    Those items go, each, to the cluster with room it values most; :func:`cancel_exchange_cycles`
    then puts them right.
    """
    n, k = benefit.shape
    m = n // k
    tail = max(k, n // 256) if tail is None else tail
    span = float(benefit.max() - benefit.min()) or 1.0
    eps, final_eps = span / 4, span * final_eps
    prices = benefit.new_zeros(k)  # (k,) each cluster's cheapest slot
    slots = benefit.new_zeros(k, m)  # (k, m) slot prices, descending along each row
    holders = torch.full((k, m), -1, dtype=torch.long)  # (k, m) item in each slot, -1: none
    labels = torch.full((n,), -1, dtype=torch.long)
    bids = benefit.new_zeros(n)  # (n,) price of each held item's slot
    while True:
        while len(free := (labels < 0).nonzero().squeeze(1)) > tail:
            top = (benefit[free] - prices).topk(2, dim=1)  # (free, 2): best and second-best value
            choice = top.indices[:, 0]
            bid = benefit[free, choice] - top.values[:, 1] + eps  # (free,)
            rows = choice.unique()  # the clusters bid for, ascending
            cluster = torch.cat([rows.repeat_interleave(m), choice])
            price = torch.cat([slots[rows].flatten(), bid])
            item = torch.cat([holders[rows].flatten(), free])
            order = price.argsort(descending=True, stable=True)
            order = order[cluster[order].argsort(stable=True)]  # by cluster, then by price, highest first
            size = torch.bincount(cluster, minlength=k)[rows]
            rank = torch.arange(len(order)) - (size.cumsum(0) - size).repeat_interleave(size)
            kept = order[rank < m].view(len(rows), m)  # each cluster's m highest prices
            evicted = item[order[rank >= m]]
            labels[evicted[evicted >= 0]] = -1
            slots[rows], holders[rows] = price[kept], item[kept]
            held = holders[rows].flatten()  # (rows * m,)
            mask = held >= 0
            labels[held[mask]] = rows.repeat_interleave(m)[mask]
            bids[held[mask]] = slots[rows].flatten()[mask]
            prices[rows] = slots[rows, -1]
        if eps <= final_eps:
            break
        eps = max(eps / theta, final_eps)
        held = (labels >= 0).nonzero().squeeze(1)
        own = labels[held, None]
        value = (benefit[held] - prices).scatter_(1, own, float("-inf"))  # (held, k): elsewhere
        breaks = benefit[held].gather(1, own).squeeze(1) - bids[held] < value.max(dim=1).values - eps
        if breaks.any():
            empty = torch.isin(holders, held[breaks])
            labels[held[breaks]] = -1
            holders[empty] = -1
            slots = torch.where(empty, prices[:, None], slots)
            order = slots.argsort(dim=1, descending=True, stable=True)
            slots, holders = slots.gather(1, order), holders.gather(1, order)
    room = m - torch.bincount(labels[labels >= 0], minlength=k)  # (k,)
    for i in (labels < 0).nonzero().squeeze(1).tolist():
        labels[i] = int(benefit[i].masked_fill(room == 0, float("-inf")).argmax())
        room[labels[i]] -= 1
    return labels


def exchange_graph(benefit: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cheapest single move between each pair of clusters of a balanced assignment:
    ``loss[j, l] = min_{i in j} s_ij - s_il`` (``inf`` on the diagonal) and the item ``i`` achieving it,
    both ``(k, k)``. It is the residual graph of the transportation problem contracted onto clusters."""
    n, k = benefit.shape
    members = labels.argsort(stable=True).view(k, n // k)  # (k, m) items of each cluster
    moves = (benefit.gather(1, labels[:, None]) - benefit)[members]  # (k, m, k): loss of moving i to l
    loss, best = moves.min(dim=1)  # (k, k)
    return loss.fill_diagonal_(float("inf")), members.gather(1, best)


def negative_cycle(loss: torch.Tensor, tol: float) -> list[int] | None:
    """Clusters ``[c_0, c_1, ...]`` forming a cycle ``c_1 -> c_0, c_2 -> c_1, ..., c_0 -> c_last`` of total
    ``loss`` below ``-tol``, or None: Bellman-Ford from every node at once, stopped as soon as the
    predecessor graph closes a cycle (such a cycle is negative, and one appears while any exists)."""
    k = loss.shape[0]
    dist = loss.new_zeros(k)
    pred = [-1] * k
    while True:
        best, source = (dist[:, None] + loss).min(dim=0)  # (k,): relax every edge
        better = best < dist - tol
        if not better.any():
            return None
        dist = torch.where(better, best, dist)
        for v in better.nonzero().squeeze(1).tolist():
            pred[v] = int(source[v])
        state = [0] * k  # 0 unseen, 1 on the current walk, 2 done
        for start in range(k):
            walk, v = [], start
            while v >= 0 and state[v] == 0:
                state[v] = 1
                walk.append(v)
                v = pred[v]
            if v >= 0 and state[v] == 1:
                return walk[walk.index(v) :]
            for u in walk:
                state[u] = 2


def cancel_exchange_cycles(benefit: torch.Tensor, labels: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """The optimal balanced assignment reached from ``labels`` by cycle cancelling (Klein 1967).

    A balanced assignment is optimal if and only if no cycle of clusters ``j_1 -> j_2 -> ... -> j_1``,
    moving one item along each edge, gains total benefit: every cycle of the transportation problem's
    residual graph is such a cycle of :func:`exchange_graph`. While :func:`negative_cycle` finds one
    with loss below ``tol`` times the benefits' range, its moves are made. Each pass costs ``O(n k)``.
    """
    labels = labels.clone()
    tol *= float(benefit.max() - benefit.min()) or 1.0
    while True:
        loss, item = exchange_graph(benefit, labels)
        cycle = negative_cycle(loss, tol)
        if cycle is None:
            return labels
        for to, source in zip(cycle, cycle[1:] + cycle[:1]):  # the edge source -> to moves one item
            labels[item[source, to]] = to


def balanced_kmeans(
    features: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 12, in_place: bool = False
) -> torch.Tensor:
    """Spherical k-means with equal cluster sizes over the rows of ``features`` ``(n, f)``.

    Rows are unit-normalised (``in_place``: in ``features`` itself, a float32 tensor the caller no
    longer needs, so that no copy exists), similarity is the cosine, and each assignment step is
    :func:`balanced_assign`; starts from ``k`` rows picked by k-means++ seeding.
    """
    x = features if in_place else features.float().clone()
    x.div_(x.norm(dim=1, keepdim=True).clamp_min(1e-12))  # (n, f)
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator, device=generator.device))
    centroids = [x[first]]
    nearest = x @ x[first]  # (n,) cosine to the closest centroid so far
    for _ in range(1, k):
        distance = (1 - nearest).clamp_min(0)  # (n,)
        pick = int(torch.multinomial((distance + 1e-12).to(generator.device), 1, generator=generator))
        centroids.append(x[pick])
        # one column at a time: x @ (f, 2..11) is ~50x slower than a matrix-vector product when x is a
        # transposed view, as the coactivation features are
        nearest = torch.maximum(nearest, x @ x[pick])
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
    activations = ffn.abs_activations(stats.inputs)  # (d_ff, samples)
    return balanced_kmeans(activations, experts, generator, in_place=True)


@PARTITIONS.register("parameters", "neurons with similar input weights share an expert (balanced k-means on weight rows)")
def by_parameters(ffn: DenseFFN, stats: LayerStats, experts: int, generator: torch.Generator) -> torch.Tensor:
    """Neurons with similar input weights share an expert (MoEfication's parameter clustering split)."""
    rows = ffn.w_up if ffn.w_gate is None else torch.cat([ffn.w_gate, ffn.w_up], dim=1)  # (d_ff, hidden[*2])
    return balanced_kmeans(rows, experts, generator)


@PARTITIONS.register("random", "neurons assigned to experts at random (baseline)")
def at_random(ffn: DenseFFN, stats: LayerStats, experts: int, generator: torch.Generator) -> torch.Tensor:
    """A random equal split: the baseline that any real method must beat."""
    order = torch.randperm(ffn.size, generator=generator, device=generator.device)
    labels = torch.empty(ffn.size, dtype=torch.long, device=generator.device)
    labels[order] = torch.arange(ffn.size, device=generator.device) % experts
    return labels.to(ffn.w_up.device)
