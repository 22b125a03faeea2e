"""Turn dense FFN weights plus a partition and routers into MoE modules, and swap them in place."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from . import moe
from .archs import Arch
from .ffn import CHUNK, DenseFFN, expert_members
from .stages.coverage import coverage_for
from .stages.refit import refit_experts


@dataclass
class LayerSplit:
    """One FFN layer cut into experts, ready to become an MoE feed-forward at any top-k."""

    routed: DenseFFN  # the neurons that are routed (all of them without a shared expert)
    labels: torch.Tensor  # (routed.size,): expert of each routed neuron, -1 if pruned
    router: moe.Router
    experts: int
    activation: str
    sample: torch.Tensor  # calibration FFN inputs (tokens, hidden)
    shared: DenseFFN | None = None  # the always-on expert's neurons
    compensate: bool = True  # unselected experts stand in by their mean output on the sample
    refit_to: DenseFFN | None = None  # the whole dense FFN, when the down projections are refit to its output
    dynamic: bool = False  # dynamic top-k: tokens take experts until a coverage, set so the mean is the top-k
    ramp: float = 0.0  # dynamic top-k, > 0: a soft boundary (experts near it taken in part)

    @property
    def expert_size(self) -> int:
        return int((self.labels == 0).sum())

    @property
    def shared_size(self) -> int:
        return 0 if self.shared is None else self.shared.size

    def to(self, device: torch.device | str) -> LayerSplit:
        """The split with its tensors on ``device`` (to gather splits made on other processes'
        accelerators, say); the router moves in place, as ``nn.Module.to`` does."""
        move = lambda part: None if part is None else part.to(device)  # noqa: E731
        return replace(
            self, routed=move(self.routed), labels=move(self.labels), router=move(self.router), sample=move(self.sample),
            shared=move(self.shared), refit_to=move(self.refit_to),
        )  # fmt: skip

    def build(self, top_k: int) -> moe.MoEFeedForward:
        """The MoE feed-forward at ``top_k`` (with ``dynamic``: ``top_k`` experts per token on average
        on the calibration sample), refit to the dense output under that routing if asked.

        A soft boundary (``ramp``) comes last: the unselected experts' means and the refit are fit
        under the hard boundary, then the coverage is set again so that the ramp takes ``top_k``
        experts on average too. (Fit under the ramp instead, a prototype on SmolLM2 at half the FFN
        lost more: perplexity 66.0 at ramp 0.1, against 51.3 at 0.12 fit this way, same text.)"""
        dynamic = self.dynamic and top_k < self.experts
        coverage = coverage_for(self.router, self.sample, top_k) if dynamic else 0.0
        module = moe_from_dense(
            self.routed, self.labels, self.router, self.experts, top_k, self.activation,
            self.sample if self.compensate else None, self.shared, coverage,
        )  # fmt: skip
        if self.refit_to is not None:
            refit_experts(module, self.refit_to, self.sample, offsets=self.compensate)
        if dynamic and self.ramp:
            module.coverage, module.ramp = coverage_for(self.router, self.sample, top_k, self.ramp), self.ramp
        return module


@contextmanager
def swapped(block: nn.Module, arch: Arch, module: nn.Module) -> Iterator[None]:
    """``block`` with ``module`` as its FFN for the duration of the ``with``, then restored."""
    names = [arch.moe_at, *arch.identity]
    saved = {name: block.get_submodule(name) for name in names}
    param = next(block.parameters())
    moe.replace_ffn(block, arch.moe_at, list(arch.identity), module.to(param.device, param.dtype))
    try:
        yield
    finally:
        for name, original in saved.items():
            block.set_submodule(name, original)


def skip_means(
    ffn: DenseFFN, labels: torch.Tensor, selection: Callable[[torch.Tensor], torch.Tensor], sample: torch.Tensor, experts: int
) -> torch.Tensor:
    """``(experts, hidden)``: each expert's mean output over the sampled tokens that do not select it
    (``selection``: tokens -> ``(tokens, experts)``, 1 where selected, as :meth:`MoEFeedForward.selection`).

    Adding these for the unselected experts is the least-squares constant correction for what
    top-k routing drops; it is zero at ``top_k == experts`` and keeps the dense equivalence exact.

    An expert's output is linear in its neurons' activations, so the activations are summed first,
    each weighted by how far its expert was skipped, and go through the down projection once: no
    ``(tokens, experts, hidden)`` tensor.
    """
    with torch.no_grad():
        kept = labels >= 0  # a pruned neuron (label -1) belongs to no expert
        expert_of = labels.clamp_min(0)
        weighted = torch.zeros(ffn.size)  # per neuron: sum over tokens of (1 - selection) * activation
        count = torch.zeros(experts)
        for part in sample.split(CHUNK):
            skipped = 1.0 - selection(part)  # (tokens, experts)
            weighted += (ffn.neurons(part) * skipped[:, expert_of]).sum(0)
            count += skipped.sum(0)
        outputs = (ffn.w_down[:, kept] * weighted[kept]).T  # (kept neurons, hidden)
        # summed by a product with the experts' one-hot membership, not index_add_: an accelerator's
        # index_add_ adds in whatever order its threads finish, and the same recipe must give the same weights
        total = nn.functional.one_hot(expert_of[kept], experts).T.to(outputs.dtype) @ outputs  # (experts, hidden)
        return total / count.clamp_min(1).unsqueeze(-1)


def shared_neurons(ffn: DenseFFN, sample: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shared, routed)`` neuron indices: the ``size`` neurons with the largest mean contribution on
    the calibration ``sample`` (:meth:`DenseFFN.importance`) form the always-on shared expert."""
    order = ffn.importance(sample).argsort(descending=True)
    return order[:size].sort().values, order[size:].sort().values


# A neuron is "massive" where, on some calibration token, it alone adds more than this many times the
# median token's whole FFN output. In SmolLM2-135M such neurons are 73x-614x (two in layer 11, one in
# layer 28: the outliers on the first token that attention sinks are made of), while every other
# neuron of every layer stays below 27x.
MASSIVE = 50.0


def group_massive(labels: torch.Tensor, peaks: torch.Tensor, experts: int, threshold: float = MASSIVE) -> torch.Tensor:
    """``labels`` with each layer's massive neurons (``peaks``, :meth:`DenseFFN.peak_contributions`,
    above ``threshold``) brought together into as few experts as hold them, each by swapping places
    with a member of the expert it joins: experts stay equal-sized.

    Massive neurons fire together, on a few tokens, with outputs hundreds of times a token's usual
    FFN output. Split between two experts, a token that takes one of them and skips the other loses
    a huge output, and the stand-in mean of the skipped expert (fit over all tokens that skip it)
    becomes a large constant added to every ordinary token. In SmolLM2 at 512 experts of 3 neurons,
    one such split gave layer 11 a stand-in mean of norm 439 and an output error of 0.19 (0.02 at
    256 experts, where the two shared an expert by chance), and the converted model a perplexity of
    126.9 on the quick evaluation's text (dense 29.4; 43.0 at 256 experts).
    """
    massive = [int(j) for j in peaks.argsort(descending=True) if peaks[j] > threshold]
    if not massive:
        return labels
    labels, size, taken = labels.clone(), len(labels) // experts, set()
    for start in range(0, len(massive), size):
        group = massive[start : start + size]
        target = next((int(labels[j]) for j in group if int(labels[j]) not in taken), None)
        if target is None:
            target = min(set(range(experts)) - taken)
        taken.add(target)
        for j in group:
            if labels[j] == target:
                continue
            members = [int(k) for k in (labels == target).nonzero().squeeze(1) if int(k) not in group]
            out = min(members, key=lambda k: float(peaks[k]))  # the member it displaces: the least outlying
            labels[out], labels[j] = int(labels[j]), target
    return labels


def prune_experts(labels: torch.Tensor, importance: torch.Tensor, experts: int, keep: int) -> torch.Tensor:
    """Keep each expert's ``keep`` most important neurons; the others get label -1 (removed).

    MoEBERT-style importance pruning inside experts: ``importance`` ``(d_ff,)`` is activation x weight
    (:meth:`DenseFFN.importance`), so every expert loses its least useful neurons and stays equal-sized.
    """
    pruned = torch.full_like(labels, -1)
    for e in range(experts):
        members = (labels == e).nonzero().squeeze(1)
        best = members[importance[members].argsort(descending=True)[:keep]]
        pruned[best] = e
    return pruned


def moe_from_dense(
    ffn: DenseFFN,
    labels: torch.Tensor,
    router: moe.Router,
    experts: int,
    top_k: int,
    activation: str,
    sample: torch.Tensor | None = None,
    shared: DenseFFN | None = None,
    coverage: float = 0.0,
) -> moe.MoEFeedForward:
    """An MoE feed-forward holding exactly ``ffn``'s weights, its neurons grouped by ``labels``
    (label -1: a pruned neuron, left out); with a calibration ``sample`` ``(tokens, hidden)``,
    unselected experts are compensated by their mean. ``shared`` holds the always-on expert's neurons
    (taken out of ``ffn`` beforehand, without the down bias, which ``ffn`` keeps). ``coverage`` > 0:
    dynamic top-k (:func:`~densetomoe.moe.coverage_selection`)."""
    members = expert_members(labels, experts)  # (experts, expert_size)
    hidden = ffn.w_up.shape[1]
    module = moe.MoEFeedForward(
        hidden_size=hidden,
        num_experts=experts,
        expert_size=members.shape[1],
        top_k=top_k,
        activation=activation,
        gated=ffn.w_gate is not None,
        bias=ffn.b_up is not None,
        router_hidden=_router_hidden(router),
        shared_size=0 if shared is None else shared.size,
    )
    with torch.no_grad():
        if shared is not None:
            module.shared_up.copy_(shared.w_up)
            module.shared_down.copy_(shared.w_down.T)
            if shared.w_gate is not None:
                module.shared_gate.copy_(shared.w_gate)
            if module.shared_b_up is not None:
                module.shared_b_up.copy_(shared.b_up)
                if module.shared_b_gate is not None:
                    module.shared_b_gate.copy_(shared.b_gate)
        module.w_up.copy_(ffn.w_up[members])  # (experts, expert_size, hidden)
        module.w_down.copy_(ffn.w_down.T[members])  # (experts, expert_size, hidden)
        if ffn.w_gate is not None:
            module.w_gate.copy_(ffn.w_gate[members])
        if module.b_up is not None:
            module.b_up.copy_(ffn.b_up[members])  # (experts, expert_size)
            module.b_down.copy_(ffn.b_down)
            if module.b_gate is not None:
                module.b_gate.copy_(ffn.b_gate[members])
    module.router.load_state_dict(router.state_dict())
    module.coverage = coverage
    if sample is not None and module.sparse:
        with torch.no_grad():
            module.skip_mean.copy_(skip_means(ffn, labels, module.selection, sample, experts))
    return module


def _router_hidden(router: moe.Router) -> int:
    return router.layers[0].out_features if len(router.layers) > 1 else 0


def structure(arch: Arch, modules: dict[int, moe.MoEFeedForward]) -> moe.Structure:
    """The :class:`~densetomoe.moe.Structure` of a model whose blocks ``modules`` (index -> module) were
    converted, as ``config.densetomoe`` records it for :func:`densetomoe.moe.install_moe`."""
    first = next(iter(modules.values()))
    return moe.Structure(
        layers=arch.layers if isinstance(arch.layers, str) else list(arch.layers),
        moe_at=arch.moe_at,
        identity=list(arch.identity),
        hidden_size=first.hidden_size,
        expert_size=first.expert_size,
        activation=first.activation,
        gated=first.gated,
        bias=first.b_up is not None,
        router_hidden=_router_hidden(first.router),
        shared_size=first.shared_size,
        top_k={i: m.top_k for i, m in sorted(modules.items())},
        coverage={i: m.coverage for i, m in sorted(modules.items()) if m.coverage},
        ramp=max(m.ramp for m in modules.values()),
    )


def swap_in(model: nn.Module, arch: Arch, modules: dict[int, moe.MoEFeedForward]) -> None:
    """Replace the FFNs of ``model`` by ``modules`` (block index -> module) and record the structure
    in ``model.config``, which keeps the dense class until export."""
    blocks = moe.blocks_of(model, arch.layers)
    param = next(model.parameters())
    for index, module in modules.items():
        moe.replace_ffn(blocks[index], arch.moe_at, list(arch.identity), module.to(device=param.device, dtype=param.dtype))
    moe.record_structure(model.config, structure(arch, modules), next(iter(modules.values())).num_experts)
