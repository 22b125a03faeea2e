"""Run calibration text through the dense model and keep bounded statistics per FFN layer.

Memory stays bounded whatever the amount of text: per layer, running per-neuron sums and a uniform
reservoir sample of the FFN's *inputs* (``sample_tokens x hidden``). Neuron activations for the
sampled tokens are recomputed from those inputs and the layer's weights when they are needed, so the
full activation matrix of every token is never held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..archs import Arch
from ..console import progress
from ..moe import moe_layers


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
        return self.neurons(x).abs().mean(0) * self.w_down.norm(dim=0)

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


class Reservoir:
    """A uniform random sample of at most ``size`` rows from a stream (Vitter's algorithm R)."""

    def __init__(self, size: int, generator: torch.Generator):
        self.size, self.generator, self.seen = size, generator, 0
        self.rows: torch.Tensor | None = None
        self.filled = 0

    def add(self, rows: torch.Tensor) -> None:
        if self.rows is None:
            self.rows = rows.new_empty(self.size, rows.shape[1])
        take = min(self.size - self.filled, rows.shape[0])
        self.rows[self.filled : self.filled + take] = rows[:take]
        self.filled += take
        self.seen += take
        rest = rows[take:]
        if len(rest):
            index = torch.arange(self.seen, self.seen + len(rest), dtype=torch.float64)
            slot = (torch.rand(len(rest), generator=self.generator, dtype=torch.float64) * (index + 1)).long()
            keep = slot < self.size
            self.rows[slot[keep]] = rest[keep]
            self.seen += len(rest)

    def sample(self) -> torch.Tensor:
        return self.rows[: self.filled]


@dataclass
class LayerStats:
    """What calibration learned about one FFN layer."""

    inputs: torch.Tensor  # (samples, hidden): reservoir of FFN inputs
    tokens: int  # tokens seen
    mean_abs: torch.Tensor  # (d_ff,): mean |activation| per neuron
    fire_rate: torch.Tensor  # (d_ff,): share of tokens with activation > 0

    def subset(self, neurons: torch.Tensor) -> LayerStats:
        return LayerStats(self.inputs, self.tokens, self.mean_abs[neurons], self.fire_rate[neurons])


@dataclass
class ActivationStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    tokens: int = 0
    sequences: int = 0


def batches(tokenizer, texts: list[str], seq_len: int, batch_size: int):
    """Tokenized batches of whole documents (truncated to ``seq_len``), padded on the right.

    Hooks mask padding through ``attention_mask``; right padding also keeps every real token at the
    position a causal LM gives it without padding. Special tokens (a BOS where the family's
    tokenizer adds one) are the tokenizer's defaults.
    """
    for start in range(0, len(texts), batch_size):
        yield encode(tokenizer, texts[start : start + batch_size], seq_len)


def encode(tokenizer, texts: list[str], seq_len: int):
    """One batch as :func:`batches` makes it: cut to ``seq_len`` tokens, padded on the right."""
    return tokenizer(texts, truncation=True, max_length=seq_len, padding=True, padding_side="right", return_tensors="pt")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    arch: Arch,
    ffns: dict[int, DenseFFN],
    *,
    tokens: int,
    seq_len: int,
    batch_size: int,
    sample_tokens: int,
    seed: int = 0,
    show_progress: bool = True,
) -> ActivationStats:
    """Feed ``texts`` until ``tokens`` real (non-padding) tokens have passed; hook the FFN inputs of the
    layers in ``ffns``."""
    generator = torch.Generator().manual_seed(seed)
    blocks = moe_layers(model, {"layers": arch.layers})
    mask: dict[str, torch.Tensor] = {}
    reservoirs = {i: Reservoir(sample_tokens, generator) for i in ffns}
    sums = {i: torch.zeros(f.size, dtype=torch.float64) for i, f in ffns.items()}
    fired = {i: torch.zeros(f.size, dtype=torch.float64) for i, f in ffns.items()}

    def hook(index):
        def record(module, args):
            x = args[0].float()
            x = x.reshape(-1, x.shape[-1])[mask["tokens"].reshape(-1)]  # (real tokens, hidden); OPT passes (tokens, hidden)
            a = ffns[index].neurons(x)  # (real tokens, d_ff)
            sums[index] += a.abs().sum(0, dtype=torch.float64)
            fired[index] += (a > 0).sum(0, dtype=torch.float64)
            reservoirs[index].add(x)

        return record

    handles = [blocks[i].get_submodule(arch.up).register_forward_pre_hook(hook(i)) for i in ffns]
    stats = ActivationStats()
    device = next(model.parameters()).device
    try:
        with progress(show_progress) as bar:
            task = bar.add_task("calibrating", total=tokens)
            for batch in batches(tokenizer, texts, seq_len, batch_size):
                mask["tokens"] = batch["attention_mask"].bool().to(device)
                model(**{k: v.to(device) for k, v in batch.items()})
                seen = int(batch["attention_mask"].sum())
                stats.tokens += seen
                stats.sequences += len(batch["input_ids"])
                bar.update(task, completed=min(stats.tokens, tokens))
                if stats.tokens >= tokens:
                    break
    finally:
        for handle in handles:
            handle.remove()
    for i in ffns:
        stats.layers[i] = LayerStats(
            inputs=reservoirs[i].sample(),
            tokens=stats.tokens,
            mean_abs=(sums[i] / max(stats.tokens, 1)).float(),
            fire_rate=(fired[i] / max(stats.tokens, 1)).float(),
        )
    return stats
