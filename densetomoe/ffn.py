"""A dense feed-forward layer as plain tensors, and the formulas every stage shares for its parts.

:class:`DenseFFN` holds one layer's weights in ``nn.Linear`` layout, read through the architecture
table by :func:`dense_ffn`; partition, routing, surgery and the native export all work on it. The
formulas below (expert size, share of neurons a token computes, FFN FLOPs) are the only place these
numbers are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from .archs import Arch

CHUNK = 1024  # tokens per step wherever a whole sample's activations, (tokens, d_ff), need not exist at once


@dataclass
class DenseFFN:
    """One layer's dense FFN weights, in ``nn.Linear`` layout (rows are neurons for up and gate)."""

    w_up: torch.Tensor  # (d_ff, hidden)
    b_up: torch.Tensor | None  # (d_ff,)
    w_down: torch.Tensor  # (hidden, d_ff)
    b_down: torch.Tensor | None  # (hidden,)
    activation: nn.Module
    w_gate: torch.Tensor | None = None  # (d_ff, hidden)
    b_gate: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.w_up.shape[0]

    def neurons(self, x: torch.Tensor) -> torch.Tensor:
        """Neuron activations ``(tokens, d_ff)`` for FFN inputs ``x`` ``(tokens, hidden)``."""
        h = nn.functional.linear(x, self.w_up, self.b_up)
        if self.w_gate is None:
            return self.activation(h)
        return self.activation(nn.functional.linear(x, self.w_gate, self.b_gate)) * h

    def to(self, device: torch.device | str) -> DenseFFN:
        """The same FFN with its tensors on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return DenseFFN(**{name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in moved.items()})

    def subset(self, neurons: torch.Tensor, with_bias: bool = True) -> DenseFFN:
        """The FFN restricted to ``neurons`` (indices); the down bias stays only ``with_bias``."""
        pick = lambda t: None if t is None else t[neurons]  # noqa: E731
        return DenseFFN(
            w_up=self.w_up[neurons],
            b_up=pick(self.b_up),
            w_down=self.w_down[:, neurons],
            b_down=self.b_down if with_bias else None,
            activation=self.activation,
            w_gate=pick(self.w_gate),
            b_gate=pick(self.b_gate),
        )

    def importance(self, x: torch.Tensor) -> torch.Tensor:
        """Each neuron's mean contribution to the output on inputs ``x``: mean |a_j| x ||W_down[:, j]||
        (activation x weight importance, as MoEBERT uses to rank neurons), ``(d_ff,)``."""
        total = sum(self.neurons(part).abs().sum(0) for part in x.split(CHUNK))
        return total / len(x) * self.w_down.norm(dim=0)

    def peak_contributions(self, x: torch.Tensor) -> torch.Tensor:
        """``(d_ff,)``: each neuron's largest contribution to the output on inputs ``x``,
        ``max_t |a_tj| ||W_down[:, j]||``, as a multiple of the median token's output norm ``||y_t||``."""
        w = self.w_down.float()
        peak, norms = torch.zeros(self.size, device=w.device), []
        for part in x.split(CHUNK):
            a = self.neurons(part).float()
            peak = torch.maximum(peak, a.abs().amax(0))
            norms.append((a @ w.T).norm(dim=-1))
        return peak * w.norm(dim=0) / torch.cat(norms).median().clamp_min(1e-12)

    def abs_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``|a|`` transposed, ``(d_ff, tokens)``, built a chunk of tokens at a time (one copy in memory)."""
        out = x.new_empty(self.size, len(x), dtype=torch.float32)
        for start in range(0, len(x), CHUNK):
            part = x[start : start + CHUNK]
            out[:, start : start + len(part)] = self.neurons(part).abs().T
        return out

    def output_norms(self, x: torch.Tensor, labels: torch.Tensor, experts: int) -> torch.Tensor:
        """``(tokens, experts)``: the norm of what each expert adds to the output under neuron->expert
        ``labels``, ``||W_e a_e|| = sqrt(a_e^T (W_e^T W_e) a_e)``, from each expert's small Gram matrix
        (``expert_size`` squared) instead of its ``(tokens, hidden)`` output."""
        a = self.neurons(x)  # (tokens, d_ff)
        out = x.new_empty(x.shape[0], experts)
        for e in range(experts):
            members = (labels == e).nonzero().squeeze(1)
            w, ae = self.w_down[:, members], a[:, members]
            out[:, e] = ((ae @ (w.T @ w)) * ae).sum(-1).clamp_min(0).sqrt()
        return out

    def contributions(self, x: torch.Tensor, labels: torch.Tensor, experts: int) -> torch.Tensor:
        """Each expert's output ``(tokens, experts, hidden)`` under neuron->expert ``labels``."""
        a = self.neurons(x)  # (tokens, d_ff)
        out = x.new_zeros(x.shape[0], experts, self.w_down.shape[0])
        for e in range(experts):
            members = (labels == e).nonzero().squeeze(1)
            out[:, e] = a[:, members] @ self.w_down[:, members].T
        return out


def dense_ffn(block: nn.Module, arch: Arch, activation: nn.Module) -> DenseFFN:
    """Read a block's FFN weights through the architecture table (float32, detached)."""

    def linear(name):
        m = block.get_submodule(name)
        w = m.weight.detach().float()
        if type(m).__name__ == "Conv1D":  # GPT-2 stores (in, out)
            w = w.T
        return w, None if m.bias is None else m.bias.detach().float()

    w_up, b_up = linear(arch.up)
    w_down, b_down = linear(arch.down)
    w_gate, b_gate = linear(arch.gate) if arch.gate else (None, None)
    if arch.fused_gate_up:  # rows [gate; up], each (d_ff, hidden): the halves that chunk(2) makes
        (w_gate, w_up) = w_up.chunk(2, dim=0)
        if b_up is not None:
            (b_gate, b_up) = b_up.chunk(2, dim=0)
    return DenseFFN(w_up, b_up, w_down, b_down, activation, w_gate, b_gate)


def expert_members(labels: torch.Tensor, experts: int) -> torch.Tensor:
    """``(experts, expert_size)``: each expert's neuron indices in ascending order (label -1, a
    pruned neuron, belongs to none)."""
    return torch.stack([(labels == e).nonzero().squeeze(1) for e in range(experts)])


def expert_size(ffn_size: int, experts: int, shared_experts: int = 0, prune: float = 0.0) -> int:
    """Neurons per expert: the FFN splits into ``experts + shared_experts`` equal parts, and pruning
    removes a share ``prune`` of each routed expert's neurons (rounded; 0 means none is left)."""
    return round(ffn_size // (experts + shared_experts) * (1 - prune))


def neuron_share(top_k: int, expert_size: int, shared_size: int, ffn_size: int) -> float:
    """Share of the dense FFN's ``ffn_size`` neurons a token computes: ``top_k`` experts plus the shared one."""
    return (top_k * expert_size + shared_size) / ffn_size
