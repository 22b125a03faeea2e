"""Per-layer budgets: how many experts each layer's tokens use when the *average* share is fixed.

``--ffn-budget 0.5`` asks that a token use half of the FFN neurons on average over all layers. Each
layer can sit at one of a few :class:`Level` s (top-k of its experts, or dense); a registry entry
picks one level per layer so that the mean share stays within the budget. The math here is pure;
the pipeline measures the sensitivities it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..ffn import neuron_share
from ..registry import Registry


@dataclass(frozen=True)
class Level:
    top_k: int | None  # None: the layer stays dense
    share: float  # share of the dense FFN's neurons a token computes at this level

    @property
    def dense(self) -> bool:
        return self.top_k is None


def levels(experts: int, expert_size: int, shared_size: int, ffn_size: int) -> list[Level]:
    """The levels a layer can take, cheapest first: top-1, every ``experts // 4``-th top-k below
    ``experts``, then dense (few levels bound the sensitivity measurements)."""
    step = max(1, experts // 4)
    ks = sorted({1, *range(step, experts, step)})
    return [Level(k, neuron_share(k, expert_size, shared_size, ffn_size)) for k in ks] + [Level(None, 1.0)]


# sensitivity[layer][j]: how much quality the model loses with only that layer at level j (>= 0)
Sensitivity = dict[int, list[float]]
# (converted layers, levels, budget, num_layers of the model, sensitivity or None) -> level per layer
BudgetFn = Callable[[list[int], list[Level], float, int, Sensitivity | None], dict[int, Level]]
# Entry setting ``sensitivity``: the pipeline measures each layer's sensitivity before calling the entry.
BUDGETS: Registry[BudgetFn] = Registry("budget")


def mean_share(plan: dict[int, Level], num_layers: int) -> float:
    """Average share over all ``num_layers`` layers; layers outside ``plan`` are dense."""
    return (sum(level.share for level in plan.values()) + num_layers - len(plan)) / num_layers


def _fits(plan: dict[int, Level], budget: float, num_layers: int) -> bool:
    return mean_share(plan, num_layers) <= budget + 1e-9


@BUDGETS.register("uniform", "the same top-k in every converted layer, the largest the budget allows, then single layers spread over depth one level up while it still holds", sensitivity=False)
def uniform(layers: list[int], options: list[Level], budget: float, num_layers: int, sensitivity: Sensitivity | None = None) -> dict[int, Level]:
    """The same level everywhere: the largest whose share fits the budget, then the budget left over
    lifts evenly spaced layers one level up."""
    plan = {i: options[0] for i in layers}
    if not _fits(plan, budget, num_layers):
        raise ValueError(f"even top-{options[0].top_k} everywhere uses more than the budget of {budget:.0%}")
    for level in options[1:]:
        trial = {i: level for i in layers}
        if _fits(trial, budget, num_layers):
            plan = trial
    rank = {i: options.index(plan[i]) for i in layers}
    for i in _spread(layers):
        if rank[i] + 1 < len(options):
            trial = {**plan, i: options[rank[i] + 1]}
            if _fits(trial, budget, num_layers):
                plan = trial
    return plan


def _spread(layers: list[int]) -> list[int]:
    """Layers in an order that spreads any prefix evenly over depth (bit-reversal-like)."""
    order, seen = [], set()
    parts = 1
    while len(order) < len(layers):
        for j in range(parts):
            i = layers[min(len(layers) - 1, (2 * j + 1) * len(layers) // (2 * parts))]
            if i not in seen:
                seen.add(i)
                order.append(i)
        parts *= 2
        if parts > 4 * len(layers):
            order += [i for i in layers if i not in seen]
    return order


@BUDGETS.register("sensitivity", "layers that lose least when made sparse get fewer experts (sensitivity measured per layer on held-out text)", sensitivity=True)
def by_sensitivity(layers: list[int], options: list[Level], budget: float, num_layers: int, sensitivity: Sensitivity | None = None) -> dict[int, Level]:
    """Sensitive layers get more experts (or stay dense), robust ones fewer.

    Each layer's quality loss at each level is measured alone; assuming losses add up, layers start
    at the cheapest level and the budget goes, step by step, to the upgrade with the largest loss
    reduction per unit of share (a greedy knapsack over each layer's convex hull of levels).
    """
    if sensitivity is None:
        raise ValueError("the sensitivity budget needs measured sensitivities")
    plan = {i: options[0] for i in layers}
    if not _fits(plan, budget, num_layers):
        raise ValueError(f"even top-{options[0].top_k} everywhere uses more than the budget of {budget:.0%}")
    # a loss that grows when a layer gets *more* experts is noise: make each curve non-increasing
    curves = {i: torch.tensor(sensitivity[i]).cummin(0).values.tolist() for i in layers}
    rank = {i: 0 for i in layers}
    while True:
        best, best_gain = None, 0.0
        for i in layers:
            for j in range(rank[i] + 1, len(options)):
                extra = options[j].share - options[rank[i]].share
                trial = {**plan, i: options[j]}
                if extra <= 0 or not _fits(trial, budget, num_layers):
                    continue
                gain = (curves[i][rank[i]] - curves[i][j]) / extra
                if gain > best_gain:
                    best, best_gain = (i, j), gain
        if best is None:
            return plan
        i, j = best
        rank[i] = j
        plan[i] = options[j]
