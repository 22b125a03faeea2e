"""The mixture-of-experts feed-forward that densetomoe puts in place of a dense FFN.

This file is densetomoe's own MoE module *and* the remote code of every converted folder: export
copies it as-is to ``modeling_densetomoe.py`` and the folder's ``config.json`` names its classes in
``auto_map``. It must therefore import nothing but torch and transformers.

How a converted checkpoint is described
---------------------------------------
``config.json`` is the dense model's config plus:

* ``num_experts`` and ``num_experts_per_tok`` (the top-k; ``from_pretrained(..., num_experts_per_tok=4)``
  changes it at load time), and
* ``densetomoe``: the structure, so that this file needs no table of architectures::

      {"layers": "encoder.layer",        # ModuleList of transformer blocks, relative to base_model
       "moe_at": "intermediate",         # the submodule that becomes the MoE feed-forward
       "identity": ["output.dense"],     # submodules whose work the MoE module now does
       "moe_layers": [0, 1, 2, ...],     # which blocks were converted
       "hidden_size": 384, "expert_size": 192, "activation": "gelu",
       "gated": false, "bias": true, "router_hidden": 128,
       "shared_size": 0,                 # neurons of an always-on shared expert (0: none)
       "top_k": 2,                       # num_experts_per_tok as saved
       "layer_top_k": {"0": 4}}          # optional per-layer top-k (see layer_top_k())

Classes are made on demand from the dense class they extend: ``MoEBertModel`` is ``BertModel`` whose
``__init__`` ends by installing the MoE feed-forwards, and ``MoEBertConfig`` is ``BertConfig`` with its
own ``model_type``, so a plain ``AutoModel.from_pretrained`` without ``trust_remote_code`` refuses the
folder instead of silently loading a dense model with missing weights.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers.activations import ACT2FN

CONFIG_KEY = "densetomoe"
CLASS_PREFIX = "MoE"


class Router(nn.Module):
    """Scores experts for each token: a linear map (``hidden == 0``) or a one-hidden-layer MLP."""

    def __init__(self, hidden_size: int, num_experts: int, hidden: int = 0):
        super().__init__()
        if hidden > 0:
            self.layers = nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU(), nn.Linear(hidden, num_experts))
        else:
            self.layers = nn.Sequential(nn.Linear(hidden_size, num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (tokens, hidden) -> (tokens, experts)
        return self.layers(x)


class MoEFeedForward(nn.Module):
    """A dense FFN ``down(act(up x))`` split into ``num_experts`` groups of neurons.

    Expert ``e`` owns ``expert_size`` neurons: rows of the up (and gate) projection and the matching
    columns of the down projection, stored as ``w_up[e]``, ``w_gate[e]`` and ``w_down[e]``, each
    ``(expert_size, hidden)``. A token's output is the unweighted sum of its ``top_k`` experts' outputs,
    the mean output (``skip_mean``) of the experts it did not select, the always-on shared expert's
    output (``shared_size`` neurons, if any) and the down bias. With ``top_k == num_experts`` it is the
    dense FFN exactly (the neurons are only permuted). Only the selected experts are computed: tokens
    are grouped by expert and each group goes through one matrix product per projection.

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
        self.expert_dropout = 0.0  # training only; set by distillation
        self.decode_slots = 16  # up to this many tokens * top_k, inference takes the decode path
        self.aux: dict[str, torch.Tensor] = {}  # training only: the last forward's aux losses

    def extra_repr(self) -> str:
        shared = f", shared={self.shared_size}" if self.shared_size else ""
        return (
            f"hidden={self.hidden_size}, experts={self.num_experts} x {self.expert_size}{shared}, "
            f"top_k={self.top_k}, activation={self.activation}, gated={self.gated}"
        )

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

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        """The always-on shared expert's output ``(tokens, hidden)``."""
        h = nn.functional.linear(x, self.shared_up, self.shared_b_up)
        if self.gated:
            h = self.act(nn.functional.linear(x, self.shared_gate, self.shared_b_gate)) * h
        else:
            h = self.act(h)
        return h @ self.shared_down

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """Indices of each token's ``top_k`` experts, ``(tokens, top_k)``."""
        return self.router(x).topk(self.top_k, dim=-1).indices

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)  # (tokens, hidden)
        if self.training and torch.is_grad_enabled():
            out = self._train_forward(x)
        elif self.top_k < self.num_experts:
            return self._sparse_forward(x).reshape(shape)  # bias and shared expert included
        else:  # every expert: the dense FFN with permuted neurons
            out = self._neurons(x, slice(None)) @ self.w_down.reshape(-1, self.hidden_size)
        if self.shared_size:
            out = out.add_(self._shared(x).to(out.dtype))
        if self.b_down is not None:
            out = out.add_(self.b_down.to(out.dtype))
        return out.reshape(shape)

    def _sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference at ``top_k < num_experts``: only the selected experts are computed.

        The output, in the input's dtype, starts as what does not depend on the experts' computation:
        the down bias plus the mean output of each token's unselected experts; the shared expert and
        the selected experts add into it in place. A few tokens (decode) go expert by expert on Python
        lists of the selection; more go through :meth:`_dispatch`. (In-place ops, which autocast
        leaves alone, keep this sum in the input's dtype under autocast too.)
        """
        chosen = self.select(x)  # (tokens, top_k)
        unselected = torch.ones(len(x), self.num_experts, dtype=x.dtype, device=x.device).scatter_(1, chosen, 0.0)
        if self.b_down is None:
            out = x.new_zeros(len(x), self.hidden_size)
        else:
            out = self.b_down.to(x.dtype).repeat(len(x), 1)  # (tokens, hidden)
        out.addmm_(unselected, self.skip_mean.to(x.dtype))
        if self.shared_size:
            out.add_(self._shared(x).to(out.dtype))
        if len(x) * self.top_k <= self.decode_slots:
            self._decode(x, chosen.tolist(), out)
        else:
            self._dispatch(x, chosen, out)
        return out

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert computed, unselected ones masked out: differentiable, same value as inference."""
        tokens, experts = len(x), self.num_experts
        a = self._neurons(x, slice(None)).reshape(tokens, experts, self.expert_size)
        logits = self.router(x)  # (tokens, experts)
        probs = logits.float().softmax(-1)
        mask = torch.zeros_like(probs)
        if self.top_k >= experts:
            mask.fill_(1.0)
        else:
            mask.scatter_(1, logits.topk(self.top_k, dim=-1).indices, 1.0)
        routed = mask
        if self.expert_dropout > 0:
            mask = mask * (torch.rand_like(mask) >= self.expert_dropout)
        gate = (mask * (1.0 + probs - probs.detach())).to(a.dtype)  # straight-through: 1 in the forward
        out = (a * gate.unsqueeze(-1)).reshape(tokens, -1) @ self.w_down.reshape(-1, self.hidden_size)
        out = out + (1.0 - mask).to(out.dtype) @ self.skip_mean.to(out.dtype)
        with torch.no_grad():  # each expert's |output|: sqrt(a_e^T (W_e W_e^T) a_e)
            gram = self.w_down @ self.w_down.transpose(1, 2)  # (experts, size, size)
            norms = torch.einsum("ted,edf,tef->te", a, gram, a).clamp_min(0).sqrt().float()
            shares = norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)
        self.aux = {
            # Switch Transformer: experts * sum_e (share of routed slots) * (mean router probability)
            "balance": experts * (routed.mean(0) / max(min(self.top_k, experts), 1) * probs.mean(0)).sum(),
            "router": -(shares * logits.float().log_softmax(-1)).sum(-1).mean(),
        }
        return out

    def _decode(self, x: torch.Tensor, chosen: list[list[int]], out: torch.Tensor) -> None:
        """Add each token's chosen experts to ``out``, for a few tokens (``chosen``: their indices).

        Each selected expert runs once on the tokens that chose it, on views of its weights
        (``w_up[e]`` is contiguous: no copy) and with no sort, count or ``index_add_``: at one token
        the work is the router, ``top_k`` experts and a handful of small ops. (On 2 CPU threads that
        other processes also used, an ``index_add_`` of two rows took 68 ms, median, against 4 us for
        two row adds, and 3.5 us on 1 thread: it waits for both threads to be scheduled.)
        """
        tokens_of: dict[int, list[int]] = {}
        for token, experts in enumerate(chosen):
            for expert in experts:
                tokens_of.setdefault(expert, []).append(token)
        for expert, tokens in sorted(tokens_of.items()):
            if len(tokens) == len(x):  # every token (always so at one token)
                out.addmm_(self._neurons(x, expert).to(out.dtype), self.w_down[expert])
            elif len(tokens) == 1:  # one token: a view of its row
                t = tokens[0]
                out[t : t + 1].addmm_(self._neurons(x[t : t + 1], expert).to(out.dtype), self.w_down[expert])
            else:  # gathered, then added row by row (see above on index_add_)
                index = torch.tensor(tokens, device=x.device)
                y = self._neurons(x.index_select(0, index), expert) @ self.w_down[expert]  # (n, hidden)
                for row, t in enumerate(tokens):
                    out[t].add_(y[row])

    def _dispatch(self, x: torch.Tensor, chosen: torch.Tensor, out: torch.Tensor) -> None:
        """Add each token's chosen experts to ``out``; tokens are grouped so each expert runs once.

        Each expert gathers its own tokens just before its matrix products, so the gathered rows are
        still in cache when used (one gather of all ``tokens * k`` rows up front was up to 1.6x
        slower at 32 experts).
        """
        k = chosen.shape[-1]
        flat = chosen.reshape(-1)  # (tokens * k,)
        order = flat.argsort(stable=True)
        token_of = order // k  # token of each slot, slots grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            tokens = token_of[start : start + n]
            y = self._neurons(x.index_select(0, tokens), expert) @ self.w_down[expert]  # (n, hidden)
            out.index_add_(0, tokens, y.to(out.dtype))
            start += n


# -- installing MoE feed-forwards into a model -------------------------------------------------------
def moe_layers(model: nn.Module, structure: dict) -> list[nn.Module]:
    """The transformer blocks of ``model`` (a base model or a model with a head)."""
    base = getattr(model, "base_model", model)
    return list(base.get_submodule(structure["layers"]))


def replace_ffn(block: nn.Module, structure: dict, moe: nn.Module) -> None:
    """Put ``moe`` at ``structure['moe_at']`` of ``block`` and make the submodules it replaces identities."""
    block.set_submodule(structure["moe_at"], moe)
    for name in structure.get("identity", []):
        block.set_submodule(name, nn.Identity())


def layer_top_k(config, index: int) -> int:
    """Layer ``index``'s top-k: its own entry in ``layer_top_k`` if any, else ``num_experts_per_tok``.

    A ``num_experts_per_tok`` other than the one saved (``top_k`` in the structure), for example one
    passed to ``from_pretrained``, applies to every layer and overrides the per-layer entries.
    """
    structure = getattr(config, CONFIG_KEY)
    if config.num_experts_per_tok != structure.get("top_k", config.num_experts_per_tok):
        return config.num_experts_per_tok
    per_layer = structure.get("layer_top_k") or {}
    return int(per_layer.get(str(index), config.num_experts_per_tok))


def new_moe_ffn(config, index: int = 0) -> MoEFeedForward:
    """An empty MoE feed-forward shaped as ``config`` describes for block ``index``."""
    s = getattr(config, CONFIG_KEY)
    return MoEFeedForward(
        hidden_size=s["hidden_size"],
        num_experts=config.num_experts,
        expert_size=s["expert_size"],
        top_k=layer_top_k(config, index),
        activation=s["activation"],
        gated=s["gated"],
        bias=s["bias"],
        router_hidden=s["router_hidden"],
        shared_size=s.get("shared_size", 0),
    )


def install_moe(model: nn.Module, config) -> None:
    """Replace the FFN of every converted block of ``model`` by an empty MoE feed-forward."""
    structure = getattr(config, CONFIG_KEY)
    blocks = moe_layers(model, structure)
    for index in structure["moe_layers"]:
        replace_ffn(blocks[index], structure, new_moe_ffn(config, index))


def set_top_k(model: nn.Module, top_k: int) -> None:
    """Change how many experts each token uses, everywhere in ``model`` (and in its config); this
    replaces any per-layer top-k."""
    found = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    if not found:
        raise ValueError("this model has no MoE feed-forward layers")
    if not 1 <= top_k <= found[0].num_experts:
        raise ValueError(f"top_k must be between 1 and {found[0].num_experts}, got {top_k}")
    for m in found:
        m.top_k = top_k
    if hasattr(model, "config"):
        model.config.num_experts_per_tok = top_k
        structure = getattr(model.config, CONFIG_KEY, None)
        if structure:
            setattr(model.config, CONFIG_KEY, {**structure, "top_k": top_k, "layer_top_k": {}})


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

        attrs = {"__init__": __init__, "config_class": moe_config_class(dense.config_class), "__module__": __name__}
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
