"""The mixture-of-experts feed-forward that densetomoe puts in place of a dense FFN.

This file is densetomoe's own MoE module *and* the remote code of every converted folder: export
copies it as-is to ``modeling_densetomoe.py`` and the folder's ``config.json`` names its classes in
``auto_map``. It must therefore import nothing but torch and transformers.

How a converted checkpoint is described
---------------------------------------
``config.json`` is the dense model's config plus:

* ``num_experts``, and ``num_experts_per_tok``: transformers' name for the top-k. It is the most
  common per-layer top-k; ``from_pretrained(..., num_experts_per_tok=4)`` sets every layer to 4.
* ``densetomoe``: the :class:`Structure`, so that this file needs no table of architectures::

      {"layers": "encoder.layer",        # ModuleList of transformer blocks, relative to base_model;
                                         # a list of them for an encoder-decoder (see blocks_of)
       "moe_at": "intermediate",         # the submodule that becomes the MoE feed-forward
       "identity": ["output.dense"],     # submodules whose work the MoE module now does
       "hidden_size": 384, "expert_size": 192, "activation": "gelu",
       "gated": false, "bias": true, "router_hidden": 128,
       "shared_size": 0,                 # neurons of an always-on shared expert (0: none)
       "top_k": {"0": 2, "1": 4, ...},   # each converted block's top-k: the one home of top-k
       "coverage": {"0": 0.83, ...},     # dynamic top-k's coverage per block (absent: fixed top-k)
       "ramp": 0.1}                      # dynamic top-k with a soft boundary (absent: a hard one)

Classes are made on demand from the dense class they extend: ``MoEBertModel`` is ``BertModel`` whose
``__init__`` ends by installing the MoE feed-forwards, and ``MoEBertConfig`` is ``BertConfig`` with its
own ``model_type``, so a plain ``AutoModel.from_pretrained`` without ``trust_remote_code`` refuses the
folder instead of silently loading a dense model with missing weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn
from transformers.activations import ACT2FN

CONFIG_KEY = "densetomoe"
CLASS_PREFIX = "MoE"
ROUTER_AUX_LOSS_COEF = 0.001  # transformers' default for its own MoE models (Mixtral, Qwen2-MoE)


class Router(nn.Module):
    """Scores experts for each token: a linear map (``hidden == 0``) or a one-hidden-layer MLP."""

    def __init__(self, hidden_size: int, num_experts: int, hidden: int = 0):
        super().__init__()
        if hidden > 0:
            self.layers = nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU(), nn.Linear(hidden, num_experts))
        else:
            self.layers = nn.Sequential(nn.Linear(hidden_size, num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (tokens, hidden) -> (tokens, experts)
        """Scores in float32 whatever the model's dtype (autocast included): in bfloat16, with 8 bits
        of mantissa, experts whose scores are close tie or swap places."""
        if x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
            return self.layers(x)  # already float32: the plain modules (on the decode path, per token)
        h = x.float()
        with torch.autocast(x.device.type, enabled=False):
            for layer in self.layers:
                if isinstance(layer, nn.Linear):
                    h = nn.functional.linear(h, layer.weight.float(), None if layer.bias is None else layer.bias.float())
                else:
                    h = layer(h)
        return h


def covered_before(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's experts by descending router probability ``probs`` ``(tokens, experts)``: the
    probability of the experts ranked before each one (exactly 0 for the first), and their order."""
    ordered, order = probs.sort(dim=-1, descending=True)
    return ordered.cumsum(-1) - ordered, order


def coverage_selection(probs: torch.Tensor, coverage: float, ramp: float = 0.0) -> torch.Tensor:
    """Dynamic top-k: ``(tokens, experts)``, each expert's weight for each token, from the router
    probabilities ``probs``.

    ``ramp == 0``: 1 where a token takes an expert, 0 where not. Each token takes experts in order of
    probability until the ones taken cover ``coverage`` of it: an expert is taken when the probability
    of those before it is still below ``coverage`` (so the first always is).

    ``ramp > 0`` (a soft boundary): the same rule as a threshold ``t`` on each expert's own
    probability, with a ramp. An expert's weight is ``clamp((p - t) / (ramp * t), 0, 1)``: whole
    above ``(1 + ramp) t``, in part between, nothing below ``t``; a token's ``t`` is set so that the
    weighted probability covers ``coverage`` (:func:`ramp_threshold`). The part of an expert not
    taken stands in by its mean, as an unselected expert's does (so does part of an expert that alone
    covers more than ``coverage``, which the hard rule takes whole). The weights are a continuous
    function of the probabilities, so a small change of the input (half-precision rounding) moves
    the output a little, where the hard rule switches an expert on or off, also when two experts of
    nearly equal probability trade places at the boundary. With ``ramp`` towards 0 it takes the hard
    rule's experts, the one completing the coverage in part.
    """
    if ramp > 0:
        if coverage >= 1.0:
            return torch.ones_like(probs)
        return ramp_weights(probs, ramp_threshold(probs, coverage, ramp), ramp)
    return (coverage_values(probs) < coverage).to(probs.dtype)


def ramp_weights(probs: torch.Tensor, threshold: torch.Tensor, ramp: float) -> torch.Tensor:
    """A soft boundary's weight of each expert at ``threshold`` (broadcast against ``probs``):
    ``clamp((p - t) / (ramp t), 0, 1)``."""
    return ((probs - threshold) / (ramp * threshold)).clamp(0.0, 1.0)


def covered_at(probs: torch.Tensor, thresholds: torch.Tensor, ramp: float) -> torch.Tensor:
    """What a soft boundary covers of each token at each of its ``thresholds`` ``(tokens, n)``:
    ``sum_e p_e ramp_weight_e(t)``, ``(tokens, n)``; non-increasing in ``t``."""
    p = probs.unsqueeze(-2)  # (tokens, 1, experts)
    return (p * ramp_weights(p, thresholds.unsqueeze(-1), ramp)).sum(-1)


def ramp_threshold(probs: torch.Tensor, coverage: float, ramp: float) -> torch.Tensor:
    """Each token's threshold ``t`` ``(tokens, 1)`` at which a soft boundary covers exactly ``coverage``
    (< 1) of it, solved exactly: the covered share is piecewise ``S + (Q / t - P) / ramp`` in ``t``
    (``S`` the probability of the experts wholly taken, ``P`` and ``Q`` the sum and the sum of squares
    of those in the ramp), with pieces between the points where an expert enters the ramp
    (``t = p / (1 + ramp)``) or leaves it (``t = p``). Find the piece, solve it."""
    points = torch.cat([probs, probs / (1.0 + ramp)], dim=-1).sort(dim=-1).values  # (tokens, 2 experts), ascending
    reached = covered_at(probs, points, ramp) >= coverage  # a prefix of each row (the share falls as t grows)
    last = (reached.sum(-1, keepdim=True) - 1).clamp_min(0)
    low = points.gather(-1, last)
    high = points.gather(-1, (last + 1).clamp_max(points.shape[-1] - 1))
    mid = (low + high) / 2  # inside the piece: who is whole and who is in the ramp
    whole = probs >= (1.0 + ramp) * mid
    ramped = (probs > mid) & ~whole
    s = (probs * whole).sum(-1, keepdim=True)
    q = (probs.square() * ramped).sum(-1, keepdim=True)
    a = (probs * ramped).sum(-1, keepdim=True)
    return torch.where(q > 0, q / (ramp * (coverage - s) + a).clamp_min(1e-30), high)


def coverage_values(probs: torch.Tensor, ramp: float = 0.0) -> torch.Tensor:
    """``(tokens, experts)``: the coverage below which a token does not take each expert. Without a
    ramp, the probability of the experts ranked before it (:func:`covered_before`); with one, what a
    threshold at the expert's own probability covers. A token takes the experts whose value is below
    the coverage, so these values set a coverage for a mean number of experts (``coverage_for``)."""
    if ramp > 0:
        return covered_at(probs, probs, ramp)
    before, order = covered_before(probs)
    return torch.empty_like(before).scatter_(1, order, before)


class MoEFeedForward(nn.Module):
    """A dense FFN ``down(act(up x))`` split into ``num_experts`` groups of neurons.

    Expert ``e`` owns ``expert_size`` neurons: rows of the up (and gate) projection and the matching
    columns of the down projection, stored as ``w_up[e]``, ``w_gate[e]`` and ``w_down[e]``, each
    ``(expert_size, hidden)``. A token's output is the unweighted sum of its ``top_k`` experts' outputs,
    the mean output (``skip_mean``) of the experts it did not select, the always-on shared expert's
    output (``shared_size`` neurons, if any) and the down bias. With ``top_k == num_experts`` it is the
    dense FFN exactly (the neurons are only permuted). Only the selected experts are computed: tokens
    are grouped by expert and each group goes through one matrix product per projection.

    With ``coverage`` set (dynamic top-k, :func:`coverage_selection`), the number of experts varies
    per token: each takes experts by router probability until they cover that share of it, and
    ``top_k`` is the mean the coverage was set for on calibration tokens (what FLOPs are counted at).
    With a ``ramp`` too (a soft boundary), experts near a token's boundary are taken in part, so that
    outputs change smoothly with the router's probabilities (half precision flips fewer experts).

    Training (``model.train()`` with gradients on) takes a masked dense path with the same forward
    value, so that the router learns through a straight-through gate and the aux losses exist:

    * each selected expert's output is scaled by ``1 + p_e - stopgrad(p_e)`` (``p`` the router's
      softmax): exactly 1 in the forward, the softmax's gradient in the backward;
    * ``expert_dropout`` drops each selected expert of a token with that probability (it then counts
      as unselected and contributes its ``skip_mean``);
    * ``aux`` holds a Switch-style load-balancing loss and a router loss: cross-entropy between the
      router's softmax and each expert's measured share of the output norm on these tokens (the
      target the router was trained on at conversion).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        expert_size: int,
        top_k: int,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = True,
        router_hidden: int = 0,
        shared_size: int = 0,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.expert_size = expert_size
        self.top_k = top_k
        self.gated = gated
        self.activation = activation
        self.act = ACT2FN[activation]
        shape = (num_experts, expert_size, hidden_size)
        self.w_up = nn.Parameter(torch.zeros(shape))
        self.w_gate = nn.Parameter(torch.zeros(shape)) if gated else None
        self.w_down = nn.Parameter(torch.zeros(shape))
        self.b_up = nn.Parameter(torch.zeros(num_experts, expert_size)) if bias else None
        self.b_gate = nn.Parameter(torch.zeros(num_experts, expert_size)) if bias and gated else None
        self.b_down = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        # What each expert adds on average when it is *not* selected (zeros: nothing is added).
        self.skip_mean = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.router = Router(hidden_size, num_experts, router_hidden)
        self.shared_size = shared_size
        if shared_size:
            shared = (shared_size, hidden_size)
            self.shared_up = nn.Parameter(torch.zeros(shared))
            self.shared_gate = nn.Parameter(torch.zeros(shared)) if gated else None
            self.shared_down = nn.Parameter(torch.zeros(shared))
            self.shared_b_up = nn.Parameter(torch.zeros(shared_size)) if bias else None
            self.shared_b_gate = nn.Parameter(torch.zeros(shared_size)) if bias and gated else None
        self.coverage = 0.0  # > 0: dynamic top-k (see the class docstring); 0: each token takes top_k
        self.ramp = 0.0  # dynamic top-k only, > 0: a soft boundary (coverage_selection)
        self.expert_dropout = 0.0  # training only; set by distillation
        self.decode_slots = 16  # up to this many tokens * top_k, inference takes the decode path
        self.aux: dict[str, torch.Tensor] = {}  # training only: the last forward's aux losses

    def extra_repr(self) -> str:
        shared = f", shared={self.shared_size}" if self.shared_size else ""
        soft = f", soft boundary: ramp {self.ramp:g}" if self.ramp else ""
        routing = f"top_k={self.top_k}" + (f" on average (coverage {self.coverage:.3f}{soft})" if self.coverage else "")
        return (
            f"hidden={self.hidden_size}, experts={self.num_experts} x {self.expert_size}{shared}, "
            f"{routing}, activation={self.activation}, gated={self.gated}"
        )

    @property
    def sparse(self) -> bool:
        """Whether tokens skip experts: dynamic top-k, or a top-k below the number of experts."""
        return bool(self.coverage) or self.top_k < self.num_experts

    @property
    def routing(self) -> Routing:
        """How this layer picks experts (what :func:`set_top_k` takes back)."""
        return Routing(self.top_k, self.coverage)

    # -- the experts' computation ------------------------------------------------------------------
    def _neurons(self, x: torch.Tensor, experts: slice | int) -> torch.Tensor:
        """Activations of the neurons of ``experts`` (an index, or a slice of all of them)."""
        if isinstance(experts, int):
            w_up, b_up = self.w_up[experts], None if self.b_up is None else self.b_up[experts]
        else:  # all experts at once: the dense FFN with permuted neurons
            w_up = self.w_up.reshape(-1, self.hidden_size)
            b_up = None if self.b_up is None else self.b_up.reshape(-1)
        h = nn.functional.linear(x, w_up, b_up)  # (tokens, neurons)
        if not self.gated:
            return self.act(h)
        if isinstance(experts, int):
            w_gate, b_gate = self.w_gate[experts], None if self.b_gate is None else self.b_gate[experts]
        else:
            w_gate = self.w_gate.reshape(-1, self.hidden_size)
            b_gate = None if self.b_gate is None else self.b_gate.reshape(-1)
        return self.act(nn.functional.linear(x, w_gate, b_gate)) * h

    def _shared_neurons(self, x: torch.Tensor) -> torch.Tensor:
        """Activations of the always-on shared expert's neurons ``(tokens, shared_size)``."""
        h = nn.functional.linear(x, self.shared_up, self.shared_b_up)
        if self.gated:
            return self.act(nn.functional.linear(x, self.shared_gate, self.shared_b_gate)) * h
        return self.act(h)

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        """The always-on shared expert's output ``(tokens, hidden)``."""
        return self._shared_neurons(x) @ self.shared_down

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """Indices of each token's ``top_k`` experts, ``(tokens, top_k)`` (fixed top-k only)."""
        if self.coverage:
            raise ValueError("with dynamic top-k tokens take different numbers of experts: use selection()")
        return self.router(x).topk(self.top_k, dim=-1).indices

    def selection(self, x: torch.Tensor) -> torch.Tensor:
        """``(tokens, experts)`` in float32: each expert's weight for each token, fixed or dynamic top-k:
        1 where the token takes it, 0 where not, between for experts in a soft boundary's ramp."""
        return self._selection(self.router(x))

    def _selection(self, logits: torch.Tensor) -> torch.Tensor:
        if self.coverage:
            return coverage_selection(logits.float().softmax(-1), self.coverage, self.ramp)
        chosen = logits.topk(min(self.top_k, self.num_experts), dim=-1).indices
        return torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter_(1, chosen, 1.0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)  # (tokens, hidden)
        if self.training and torch.is_grad_enabled():
            out = self._train_forward(x)
        elif self.sparse and _tracing():
            out = self._masked_forward(x)
        elif self.sparse:
            return self._sparse_forward(x).reshape(shape)  # bias and shared expert included
        else:  # every expert: the dense FFN with permuted neurons
            out = self._neurons(x, slice(None)) @ self.w_down.reshape(-1, self.hidden_size)
        if self.shared_size:
            out = out.add_(self._shared(x).to(out.dtype))
        if self.b_down is not None:
            out = out.add_(self.b_down.to(out.dtype))
        return out.reshape(shape)

    def _sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference when tokens skip experts: only the selected experts are computed.

        The output, in the input's dtype, starts as what does not depend on the experts' computation:
        the down bias plus the mean output of each token's unselected experts; the shared expert and
        the selected experts add into it in place. A few tokens (decode) go expert by expert on Python
        lists of the selection; more go through :meth:`_dispatch`. (In-place ops, which autocast
        leaves alone, keep this sum in the input's dtype under autocast too.)
        """
        weights = None  # a soft boundary's expert weights, (tokens, experts)
        if self.coverage:  # dynamic top-k: from the (tokens, experts) selection
            selected = self.selection(x)
            unselected = (1.0 - selected).to(x.dtype)
            taken = selected > 0
            slots = int(taken.sum())
            if self.ramp:
                weights = selected.to(x.dtype)
        else:
            chosen = self.select(x)  # (tokens, top_k)
            unselected = torch.ones(len(x), self.num_experts, dtype=x.dtype, device=x.device).scatter_(1, chosen, 0.0)
            slots = len(x) * self.top_k
        if self.b_down is None:
            out = x.new_zeros(len(x), self.hidden_size)
        else:
            out = self.b_down.to(x.dtype).repeat(len(x), 1)  # (tokens, hidden)
        out.addmm_(unselected, self.skip_mean.to(x.dtype))
        if self.shared_size:
            out.add_(self._shared(x).to(out.dtype))
        if slots <= self.decode_slots:
            pairs = taken.nonzero().tolist() if self.coverage else [(t, e) for t, row in enumerate(chosen.tolist()) for e in row]
            self._decode(x, pairs, out, weights)
        elif self.coverage:
            tokens = taken.T.nonzero()[:, 1]  # (slots,): the tokens of each expert, expert by expert
            slot_weights = None if weights is None else weights.T[taken.T]  # in the same order
            self._dispatch(x, tokens, taken.sum(0).tolist(), out, slot_weights)
        else:
            k = chosen.shape[-1]
            flat = chosen.reshape(-1)  # (tokens * k,)
            tokens = flat.argsort(stable=True) // k  # token of each slot, slots grouped by expert
            self._dispatch(x, tokens, torch.bincount(flat, minlength=self.num_experts).tolist(), out)
        return out

    def _masked_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What :meth:`_sparse_forward` computes, with shapes that do not depend on the routing, for
        ``torch.compile(fullgraph=True)`` and ``torch.export``: every expert runs and the unselected
        ones are masked out, so it costs the dense FFN's FLOPs (sparse speed in a graph: ``--format
        native``, whose transformers kernels group tokens by expert)."""
        a = self._neurons(x, slice(None)).reshape(len(x), self.num_experts, self.expert_size)
        mask = self.selection(x).to(a.dtype)
        return self._masked_sum(a, mask, mask)

    def _masked_sum(self, a: torch.Tensor, gate: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The experts' outputs from all their activations ``a`` ``(tokens, experts, size)``, each
        weighted by ``gate`` ``(tokens, experts)``, plus the mean output of the experts ``mask`` leaves out."""
        out = (a * gate.to(a.dtype).unsqueeze(-1)).reshape(len(a), -1) @ self.w_down.reshape(-1, self.hidden_size)
        return out + (1.0 - mask).to(out.dtype) @ self.skip_mean.to(out.dtype)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert computed, unselected ones masked out: differentiable, same value as inference."""
        tokens, experts = len(x), self.num_experts
        a = self._neurons(x, slice(None)).reshape(tokens, experts, self.expert_size)
        logits = self.router(x)  # (tokens, experts)
        probs = logits.float().softmax(-1)
        mask = self._selection(logits)
        routed = mask
        if self.expert_dropout > 0:
            mask = mask * (torch.rand_like(mask) >= self.expert_dropout)
        gate = mask * (1.0 + probs - probs.detach())  # straight-through: 1 in the forward
        out = self._masked_sum(a, gate, mask)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            shares = output_shares(a, self.w_down)
        self.aux = {
            # Switch Transformer: experts * sum_e (share of routed slots) * (mean router probability)
            "balance": experts * (routed.sum(0) / routed.sum().clamp_min(1) * probs.mean(0)).sum(),
            "router": -(shares * logits.float().log_softmax(-1)).sum(-1).mean(),
        }
        return out

    def _decode(self, x: torch.Tensor, pairs: list[tuple[int, int]], out: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add each token's chosen experts to ``out``, for a few tokens (``pairs``: (token, expert)),
        each scaled by its ``weights`` ``(tokens, experts)`` entry if given (a soft boundary).

        Each selected expert runs once on the tokens that chose it, on views of its weights
        (``w_up[e]`` is contiguous: no copy) and with no sort, count or ``index_add_``: at one token
        the work is the router, ``top_k`` experts and a handful of small ops. (On 2 CPU threads that
        other processes also used, an ``index_add_`` of two rows took 68 ms, median, against 4 us for
        two row adds, and 3.5 us on 1 thread: it waits for both threads to be scheduled.)
        """
        tokens_of: dict[int, list[int]] = {}
        for token, expert in pairs:
            tokens_of.setdefault(expert, []).append(token)
        def weighted(a: torch.Tensor, rows: slice | torch.Tensor, expert: int) -> torch.Tensor:
            return a if weights is None else a * weights[rows, expert : expert + 1].to(a.dtype)

        for expert, tokens in sorted(tokens_of.items()):
            if len(tokens) == len(x):  # every token (always so at one token)
                a = weighted(self._neurons(x, expert), slice(None), expert)
                out.addmm_(a.to(out.dtype), self.w_down[expert])
            elif len(tokens) == 1:  # one token: a view of its row
                t = tokens[0]
                a = weighted(self._neurons(x[t : t + 1], expert), slice(t, t + 1), expert)
                out[t : t + 1].addmm_(a.to(out.dtype), self.w_down[expert])
            else:  # gathered, then added row by row (see above on index_add_)
                index = torch.tensor(tokens, device=x.device)
                y = weighted(self._neurons(x.index_select(0, index), expert), index, expert) @ self.w_down[expert]  # (n, hidden)
                for row, t in enumerate(tokens):
                    out[t].add_(y[row])

    def _dispatch(
        self, x: torch.Tensor, token_of: torch.Tensor, counts: list[int], out: torch.Tensor, weight_of: torch.Tensor | None = None
    ) -> None:
        """Add each token's chosen experts to ``out``; tokens are grouped so each expert runs once.
        ``token_of`` ``(slots,)`` lists the tokens of expert 0, then of expert 1, ...; ``counts`` how many
        each expert has; ``weight_of`` ``(slots,)``, if given, scales each slot (a soft boundary).

        Each expert gathers its own tokens just before its matrix products, so the gathered rows are
        still in cache when used (one gather of all ``tokens * k`` rows up front was up to 1.6x
        slower at 32 experts).
        """
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            tokens = token_of[start : start + n]
            a = self._neurons(x.index_select(0, tokens), expert)
            if weight_of is not None:
                a = a * weight_of[start : start + n, None].to(a.dtype)
            y = a @ self.w_down[expert]  # (n, hidden)
            out.index_add_(0, tokens, y.to(out.dtype))
            start += n


def output_shares(a: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Each expert's share of the summed output norms of all experts, per token, in float32
    ``(tokens, experts)``, from their activations ``a`` ``(tokens, experts, size)`` and down projections
    ``w_down`` ``(experts, size, hidden)``: ``|a_e W_e| = sqrt(a_e^T (W_e W_e^T) a_e)``, never forming
    the ``(tokens, experts, hidden)`` outputs.

    One batched product per expert on its ``(size, size)`` Gram matrix: at 256 experts of 6 neurons
    and 2,048 tokens, 15 ms on 2 CPU cores against 31 ms for the same contraction written as
    ``einsum("ted,edf,tef->te")``, which ran as tokens x experts products of one row each.
    """
    by_expert = a.transpose(0, 1).float()  # (experts, tokens, size)
    w = w_down.float()
    gram = w @ w.transpose(1, 2)  # (experts, size, size)
    norms = (torch.bmm(by_expert, gram) * by_expert).sum(-1).clamp_min(0).sqrt().T  # (tokens, experts)
    return norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)


def _tracing() -> bool:
    """Whether torch.compile or torch.export is tracing this call (no Python lists of tensor values then)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


# -- the structure of a converted model, and installing it ----------------------------------------------
@dataclass(frozen=True)
class Routing:
    """How one MoE layer picks experts: ``top_k`` each, or with ``coverage`` > 0 dynamic top-k (a
    varying number per token, ``top_k`` on average on the calibration tokens)."""

    top_k: int
    coverage: float = 0.0


@dataclass
class Structure:
    """Where a model's MoE feed-forwards sit, their shape, and each one's top-k (``config.densetomoe``)."""

    layers: str | list[str]  # ModuleList(s) of transformer blocks, relative to base_model (see blocks_of)
    moe_at: str  # the submodule of a block that becomes the MoE feed-forward
    identity: list[str]  # submodules of a block whose work the MoE module now does
    hidden_size: int
    expert_size: int
    activation: str
    gated: bool
    bias: bool
    router_hidden: int
    shared_size: int
    top_k: dict[int, int]  # converted block index -> its top-k (with dynamic top-k: the mean)
    coverage: dict[int, float] = field(default_factory=dict)  # block index -> dynamic top-k's coverage
    ramp: float = 0.0  # dynamic top-k, > 0: a soft boundary, experts near it taken in part (coverage_selection)

    @property
    def moe_layers(self) -> list[int]:
        """The converted blocks, in order."""
        return sorted(self.top_k)

    @property
    def nominal_top_k(self) -> int:
        """What ``num_experts_per_tok`` says: :func:`nominal_top_k` of the per-layer top-k."""
        return nominal_top_k(self.top_k)

    def to_dict(self) -> dict:
        """The JSON form kept in ``config.densetomoe`` (JSON object keys are strings)."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in ("coverage", "ramp")}
        data["top_k"] = {str(i): k for i, k in sorted(self.top_k.items())}
        if self.coverage:
            data["coverage"] = {str(i): c for i, c in sorted(self.coverage.items())}
            if self.ramp:
                data["ramp"] = self.ramp
        return data

    @classmethod
    def from_dict(cls, data: dict, num_experts_per_tok: int | None = None) -> Structure:
        """Read ``config.densetomoe``; also the form of densetomoe 0.1 folders (``moe_layers`` and one
        ``top_k``, with per-layer exceptions in ``layer_top_k``)."""
        fields = {name: data[name] for name in cls.__dataclass_fields__ if name in data and name not in ("top_k", "coverage")}
        fields.setdefault("shared_size", 0)
        fields["coverage"] = {int(i): float(c) for i, c in (data.get("coverage") or {}).items()}
        top_k = data.get("top_k", num_experts_per_tok)
        if isinstance(top_k, dict):
            per_layer = {int(i): int(k) for i, k in top_k.items()}
        else:
            exceptions = data.get("layer_top_k") or {}
            per_layer = {i: int(exceptions.get(str(i), top_k)) for i in data["moe_layers"]}
        return cls(**fields, top_k=per_layer)


def nominal_top_k(top_k: dict[int, int]) -> int:
    """The most common of the per-layer ``top_k`` values (the larger on a tie)."""
    values = list(top_k.values())
    return max(set(values), key=lambda k: (values.count(k), k))


def structure_of(config) -> Structure:
    """The :class:`Structure` in ``config`` (a config object or its ``to_dict()``). A
    ``num_experts_per_tok`` other than the saved one, as ``from_pretrained(..., num_experts_per_tok=k)``
    sets it, applies to every layer (as a fixed top-k)."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    data = get(CONFIG_KEY)
    if not data:
        raise ValueError(f"this config has no {CONFIG_KEY!r} structure: it is not a converted model's")
    structure = Structure.from_dict(data, get("num_experts_per_tok"))
    asked = get("num_experts_per_tok")
    if asked is not None and asked != structure.nominal_top_k:
        structure.top_k = dict.fromkeys(structure.top_k, int(asked))
        structure.coverage = {}
    return structure


def record_structure(config, structure: Structure, num_experts: int) -> None:
    """Write ``structure`` into ``config`` (and ``num_experts``, ``num_experts_per_tok`` with it), and
    the load-balancing settings transformers' own MoE models have, where the config lacks them."""
    setattr(config, CONFIG_KEY, structure.to_dict())
    config.num_experts = num_experts
    config.num_experts_per_tok = structure.nominal_top_k
    config.output_router_logits = getattr(config, "output_router_logits", False)
    config.router_aux_loss_coef = getattr(config, "router_aux_loss_coef", ROUTER_AUX_LOSS_COEF)


def blocks_of(model: nn.Module, layers: str | list[str] | tuple[str, ...]) -> list[nn.Module]:
    """The transformer blocks of ``model`` (a base model or a model with a head) at path ``layers``:
    one ModuleList, or several (an encoder's, then a decoder's) whose blocks are numbered on in order.
    A ``*`` step stands for each element of the ModuleList before it: ``encoder.block.*.layer.1`` is
    the sublayer ``layer.1`` of every block of ``encoder.block`` (T5)."""
    base = getattr(model, "base_model", model)
    blocks = []
    for stack in [layers] if isinstance(layers, str) else layers:
        outer, _, inner = stack.partition(".*.")
        elements = list(base.get_submodule(outer))
        blocks += [element.get_submodule(inner) for element in elements] if inner else elements
    return blocks


def replace_ffn(block: nn.Module, moe_at: str, identity: list[str], module: nn.Module) -> None:
    """Put ``module`` at ``moe_at`` of ``block`` and make the submodules in ``identity`` identities."""
    block.set_submodule(moe_at, module)
    for name in identity:
        block.set_submodule(name, nn.Identity())


def new_moe_ffn(structure: Structure, num_experts: int, index: int) -> MoEFeedForward:
    """An empty MoE feed-forward shaped as ``structure`` describes for block ``index``."""
    s = structure
    module = MoEFeedForward(
        hidden_size=s.hidden_size,
        num_experts=num_experts,
        expert_size=s.expert_size,
        top_k=s.top_k[index],
        activation=s.activation,
        gated=s.gated,
        bias=s.bias,
        router_hidden=s.router_hidden,
        shared_size=s.shared_size,
    )
    module.coverage = s.coverage.get(index, 0.0)
    module.ramp = s.ramp if module.coverage else 0.0
    return module


def install_moe(model: nn.Module, config) -> None:
    """Replace the FFN of every converted block of ``model`` by an empty MoE feed-forward."""
    structure = structure_of(config)
    record_structure(config, structure, config.num_experts)  # a load-time num_experts_per_tok, now per layer
    blocks = blocks_of(model, structure.layers)
    for index in structure.moe_layers:
        replace_ffn(blocks[index], structure.moe_at, structure.identity, new_moe_ffn(structure, config.num_experts, index))


def moe_modules(model: nn.Module) -> dict[int, MoEFeedForward]:
    """``model``'s MoE feed-forwards by block index (by order found, for a model without a structure)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, CONFIG_KEY, None):
        structure = structure_of(config)
        blocks = blocks_of(model, structure.layers)
        return {i: blocks[i].get_submodule(structure.moe_at) for i in structure.moe_layers}
    return dict(enumerate(m for m in model.modules() if isinstance(m, MoEFeedForward)))


def check_top_k(top_k: int, num_experts: int) -> None:
    """A :class:`ValueError` unless ``1 <= top_k <= num_experts``."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be between 1 and {num_experts}, got {top_k}")


def set_top_k(model: nn.Module, top_k: int | dict[int, int | Routing]) -> dict[int, Routing]:
    """Set how many experts each token uses: ``top_k`` in every MoE layer, or per layer (block index ->
    top-k, for some or all layers). A layer given a top-k takes exactly that many experts per token,
    also where it used dynamic top-k before. The modules and ``model.config`` change together. Returns
    the previous per-layer :class:`Routing`, which ``set_top_k`` takes back to restore it."""
    modules = moe_modules(model)
    if not modules:
        raise ValueError("this model has no MoE feed-forward layers")
    wanted = dict.fromkeys(modules, top_k) if isinstance(top_k, int) and not isinstance(top_k, bool) else dict(top_k)
    wanted = {i: r if isinstance(r, Routing) else Routing(r) for i, r in wanted.items()}
    for index, routing in wanted.items():
        if index not in modules:
            raise ValueError(f"layer {index} has no MoE feed-forward (MoE layers: {', '.join(map(str, modules))})")
        check_top_k(routing.top_k, modules[index].num_experts)
    previous = {i: m.routing for i, m in modules.items()}
    for index, routing in wanted.items():
        modules[index].top_k, modules[index].coverage = routing.top_k, routing.coverage
    config = getattr(model, "config", None)
    if config is not None and getattr(config, CONFIG_KEY, None):
        structure = structure_of(config)
        structure.top_k = {i: m.top_k for i, m in modules.items()}
        structure.coverage = {i: m.coverage for i, m in modules.items() if m.coverage}
        record_structure(config, structure, config.num_experts)
    return previous


# -- classes made on demand from the dense ones -----------------------------------------------------
_made: dict[str, type] = {}


def moe_config_class(dense: type) -> type:
    """``MoE<Name>Config``: the dense config class under its own model_type."""
    name = CLASS_PREFIX + dense.__name__
    if name not in _made:
        _made[name] = type(name, (dense,), {"model_type": "densetomoe_" + dense.model_type, "__module__": __name__})
    return _made[name]


def moe_model_class(dense: type) -> type:
    """``MoE<Name>``: the dense model class, with MoE feed-forwards installed at the end of ``__init__``."""
    name = CLASS_PREFIX + dense.__name__
    if name not in _made:

        def __init__(self, config, *args, **kwargs):
            dense.__init__(self, config, *args, **kwargs)
            install_moe(self, config)

        # The dense forward (its signature too, which the Trainer reads to pick the inputs); in
        # training with ``config.output_router_logits``, as transformers' own MoE models do, the
        # load-balancing loss (mean over MoE layers) is returned as ``aux_loss`` and
        # ``router_aux_loss_coef`` times it is added to ``loss``.
        @functools.wraps(dense.forward)
        def forward(self, *args, **kwargs):
            if not (self.training and getattr(self.config, "output_router_logits", False)):
                return dense.forward(self, *args, **kwargs)  # inference: nothing added per call
            layers = moe_modules(self).values()
            for layer in layers:
                layer.aux = {}  # only this forward's losses count
            output = dense.forward(self, *args, **kwargs)
            balance = [m.aux["balance"] for m in layers if m.aux]
            if balance and isinstance(output, dict):
                output["aux_loss"] = torch.stack(balance).mean()
                if output.get("loss") is not None:
                    output["loss"] = output["loss"] + self.config.router_aux_loss_coef * output["aux_loss"].to(output["loss"].device)
            return output

        attrs = {
            "__init__": __init__,
            "forward": forward,
            "config_class": moe_config_class(dense.config_class),
            "__module__": __name__,
        }
        _made[name] = type(name, (dense,), attrs)
    return _made[name]


def dense_class(cls: type) -> type:
    """The dense class that an on-demand ``MoE<Name>`` class extends (``cls`` itself if it is dense)."""
    while cls.__name__.startswith(CLASS_PREFIX) and _made.get(cls.__name__) is cls:
        cls = cls.__bases__[0]
    return cls


def __getattr__(name: str) -> type:
    """Resolve ``MoEBertConfig``, ``MoEBertForSequenceClassification``, ... (what ``auto_map`` names)."""
    if name.startswith(CLASS_PREFIX):
        dense = getattr(transformers, name[len(CLASS_PREFIX) :], None)
        if isinstance(dense, type) and issubclass(dense, transformers.PreTrainedConfig):
            return moe_config_class(dense)
        if isinstance(dense, type) and issubclass(dense, transformers.PreTrainedModel):
            return moe_model_class(dense)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
