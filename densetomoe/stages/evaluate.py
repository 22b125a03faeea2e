"""A quick check of the converted model against the dense one, run at the end of every conversion.

The dense outputs on held-out text are recorded before the FFNs are swapped (the swap is in place),
then compared with the converted model's on the same batches. Only what the comparison needs is
kept: final hidden states, the head's argmax, and for a causal LM each next token's log-likelihood
(never the full ``(batch, seq, vocab)`` logits).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..efficiency import active_neurons, moe_ffn_flops
from ..moe import MoEFeedForward


@dataclass
class Probe:
    """Held-out batches and the dense model's outputs on them."""

    batches: list[dict]
    hidden: list[torch.Tensor]  # final hidden states per batch, (batch, seq, hidden)
    predictions: list[torch.Tensor | None]  # the head's argmax per batch, (batch, seq) or (batch,)
    nll: list[torch.Tensor | None]  # causal LM: -log p(next token) per batch, (batch, seq - 1)


@dataclass
class QuickReport:
    texts: int
    tokens: int
    embedding_cosine: float  # mean cosine of mean-pooled final hidden states, dense vs MoE
    hidden_rel_error: float  # ||h_moe - h_dense|| / ||h_dense|| over real tokens
    head_agreement: float | None  # share of argmax predictions that agree, where there is a head
    ffn_flops_ratio: float  # MoE / dense FFN FLOPs per token (router included)
    active_ffn_share: float  # share of FFN neurons a token uses, converted layers only
    dense_perplexity: float | None = None  # causal LM: next-token perplexity on the held-out batches
    perplexity: float | None = None  # the same for the MoE model

    def as_dict(self) -> dict:
        return asdict(self)


def _outputs(model: nn.Module, batch: dict):
    out = model(**batch, output_hidden_states=True)
    return out.hidden_states[-1].float(), getattr(out, "logits", None)


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``-log p(token t+1 | tokens <= t)``, ``(batch, seq - 1)``, from causal LM ``logits`` ``(batch, seq, vocab)``."""
    return nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), input_ids[:, 1:], reduction="none"
    )  # (batch, seq - 1)


@torch.no_grad()
def record(model: nn.Module, batches: list[dict], causal_lm: bool = False) -> Probe:
    hidden, predictions, nll = [], [], []
    for batch in batches:
        h, logits = _outputs(model, batch)
        hidden.append(h)
        predictions.append(None if logits is None else logits.argmax(-1))
        nll.append(next_token_nll(logits, batch["input_ids"]) if causal_lm and logits is not None else None)
    return Probe(batches, hidden, predictions, nll)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens' vectors: (batch, seq, hidden) -> (batch, hidden)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def ffn_flops(modules: list[MoEFeedForward], dense_ffn_size: int, num_layers: int) -> tuple[float, float]:
    """``(dense, moe)`` multiply-adds x 2 per token summed over all FFN layers (router included), for a
    model whose converted layers are ``modules``."""
    dense = moe = 0.0
    for m in modules:
        projections = 3 if m.gated else 2
        per_neuron = 2 * m.hidden_size * projections
        dense += per_neuron * dense_ffn_size
        moe += moe_ffn_flops(m)
    if modules:
        unconverted = (num_layers - len(modules)) * 2 * modules[0].hidden_size * projections * dense_ffn_size
        dense, moe = dense + unconverted, moe + unconverted
    return dense, moe


@torch.no_grad()
def damage(model: nn.Module, probe: Probe) -> float:
    """How far ``model`` has moved from the dense outputs recorded in ``probe``: the mean next-token
    NLL increase (nats) for causal LMs, else the squared relative error of the final hidden states."""
    num = den = 0.0
    for batch, dense_h, dense_nll in zip(probe.batches, probe.hidden, probe.nll):
        h, logits = _outputs(model, batch)
        mask = batch["attention_mask"].bool()
        if dense_nll is not None:
            targets = mask[:, 1:]
            num += (next_token_nll(logits, batch["input_ids"]) - dense_nll)[targets].sum().item()
            den += int(targets.sum())
        else:
            num += (h - dense_h)[mask].pow(2).sum().item()
            den += dense_h[mask].pow(2).sum().item()
    return max(num / max(den, 1e-30), 0.0)


def active_ffn_share(converted: list[MoEFeedForward], dense_ffn_size: int, num_layers: int) -> float:
    """Mean over all ``num_layers`` FFNs of the share of the dense FFN's neurons a token computes
    (layers left dense count as 1)."""
    used = sum(active_neurons(m) / dense_ffn_size for m in converted)
    return (used + num_layers - len(converted)) / max(num_layers, 1)


@torch.no_grad()
def compare(
    model: nn.Module, probe: Probe, dense_ffn_size: int, num_layers: int, converted: list[MoEFeedForward] | None = None
) -> QuickReport:
    """Fidelity of ``model`` to the dense outputs in ``probe``; FLOPs and FFN share from its converted
    layers (``converted``: the MoE modules a native model was made from; default: ``model``'s own)."""
    cosines, err_num, err_den, agree, total, tokens = [], 0.0, 0.0, 0, 0, 0
    nll_dense, nll_moe, scored = 0.0, 0.0, 0
    for batch, dense_h, dense_pred, dense_nll in zip(probe.batches, probe.hidden, probe.predictions, probe.nll):
        h, logits = _outputs(model, batch)
        mask = batch["attention_mask"].bool()
        cosines.append(
            nn.functional.cosine_similarity(mean_pool(h, mask), mean_pool(dense_h, mask), dim=-1)
        )
        err_num += (h - dense_h)[mask].pow(2).sum().item()
        err_den += dense_h[mask].pow(2).sum().item()
        tokens += int(mask.sum())
        if dense_pred is not None:
            a, b = logits.argmax(-1), dense_pred
            if a.dim() == 2:  # per-token heads: count real tokens only
                a, b = a[mask], b[mask]
            agree += int((a == b).sum())
            total += a.numel()
        if dense_nll is not None:
            targets = mask[:, 1:]  # right padding: a real next token has a real context
            nll_dense += dense_nll[targets].sum().item()
            nll_moe += next_token_nll(logits, batch["input_ids"])[targets].sum().item()
            scored += int(targets.sum())
    if converted is None:
        converted = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    dense, moe = ffn_flops(converted, dense_ffn_size, num_layers)
    share = active_ffn_share(converted, dense_ffn_size, num_layers)
    return QuickReport(
        texts=sum(len(b["input_ids"]) for b in probe.batches),
        tokens=tokens,
        embedding_cosine=float(torch.cat(cosines).mean()),
        hidden_rel_error=(err_num / max(err_den, 1e-30)) ** 0.5,
        head_agreement=agree / total if total else None,
        ffn_flops_ratio=moe / dense if dense else 1.0,
        active_ffn_share=share,
        dense_perplexity=math.exp(nll_dense / scored) if scored else None,
        perplexity=math.exp(nll_moe / scored) if scored else None,
    )
