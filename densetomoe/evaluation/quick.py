"""A quick check of the converted model against the dense one, run at the end of every conversion.

The dense outputs on held-out text are recorded before the FFNs are swapped (the swap is in place),
then compared with the converted model's on the same batches. Only what the comparison needs is
kept: final hidden states, the head's argmax, and for a causal LM each next token's log-likelihood
(never the full ``(batch, seq, vocab)`` logits).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..ffn import neuron_share
from ..moe import MoEFeedForward
from .costs import model_ffn_flops


@dataclass
class Probe:
    """Held-out batches and the dense model's outputs on them."""

    batches: list[dict]
    hidden: list[torch.Tensor]  # final hidden states per batch, (batch, seq, hidden)
    predictions: list[torch.Tensor | None]  # the head's argmax per batch, (batch, seq) or (batch,)
    nll: list[torch.Tensor | None]  # causal LM: -log p(next token) per batch, (batch, seq - 1)
    layers: list[list[torch.Tensor]] | None = None  # with all_layers: every block's output per batch

    def head(self, n: int) -> Probe:
        """The first ``n`` batches only."""
        layers = None if self.layers is None else self.layers[:n]
        return Probe(self.batches[:n], self.hidden[:n], self.predictions[:n], self.nll[:n], layers)


@dataclass
class Fidelity:
    """How close a model's outputs are to the dense outputs recorded in a :class:`Probe`."""

    texts: int
    tokens: int
    embedding_cosine: float  # mean cosine of mean-pooled final hidden states, dense vs MoE
    hidden_rel_error: float  # ||h_moe - h_dense|| / ||h_dense|| over real tokens, final hidden states
    head_agreement: float | None  # share of argmax predictions that agree, where there is a head
    layer_rel_error: list[float] | None = None  # the same error after every block (Probe.layers)
    dense_perplexity: float | None = None  # causal LM: next-token perplexity on the probe's batches
    perplexity: float | None = None  # the same for the model


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
    """Hidden states after the embeddings and after every block, and the logits (None without a head).
    An encoder-decoder's states are its encoder's, then its decoder's blocks' (the last is the
    decoder's output), as the layers are numbered."""
    out = model(**batch, output_hidden_states=True)
    states = getattr(out, "hidden_states", None)
    if states is None and getattr(out, "decoder_hidden_states", None) is not None:
        states = out.encoder_hidden_states + out.decoder_hidden_states[1:]
    return [h.float() for h in states], getattr(out, "logits", None)


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``-log p(token t+1 | tokens <= t)``, ``(batch, seq - 1)``, from causal LM ``logits`` ``(batch, seq, vocab)``."""
    return nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), input_ids[:, 1:], reduction="none"
    )  # (batch, seq - 1)


def token_nll(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """``-log p`` of each scored token: the next token for a causal LM, ``(batch, seq - 1)``; for a
    teacher-forced encoder-decoder (a batch with ``labels``), each label, ``(batch, seq)``."""
    if "labels" not in batch:
        return next_token_nll(logits, batch["input_ids"])
    return nn.functional.cross_entropy(logits.transpose(1, 2).float(), batch["labels"].clamp_min(0), reduction="none")


def scored_tokens(batch: dict) -> torch.Tensor:
    """Where :func:`token_nll` scores a real token, as a mask of its shape."""
    if "labels" not in batch:
        return batch["attention_mask"].bool()[:, 1:]  # right padding: a real next token has a real context
    return batch["labels"] != -100


@torch.no_grad()
def record(model: nn.Module, batches: list[dict], causal_lm: bool = False, all_layers: bool = False) -> Probe:
    """The dense ``model``'s outputs on ``batches``; ``all_layers`` keeps every block's output too.
    ``causal_lm``: a model that generates (a causal LM, or an encoder-decoder on teacher-forced
    batches), whose token log-likelihoods are kept for perplexity."""
    hidden, predictions, nll, layers = [], [], [], []
    for batch in batches:
        states, logits = _outputs(model, batch)
        hidden.append(states[-1])
        layers.append(states[1:])
        predictions.append(None if logits is None else logits.argmax(-1))
        nll.append(token_nll(logits, batch) if causal_lm and logits is not None else None)
    return Probe(batches, hidden, predictions, nll, layers if all_layers else None)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens' vectors: (batch, seq, hidden) -> (batch, hidden)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


@torch.no_grad()
def damage(model: nn.Module, probe: Probe) -> float:
    """How far ``model`` has moved from the dense outputs recorded in ``probe``: the mean next-token
    NLL increase (nats) for causal LMs, else the squared relative error of the final hidden states."""
    num = den = 0.0
    for batch, dense_h, dense_nll in zip(probe.batches, probe.hidden, probe.nll):
        states, logits = _outputs(model, batch)
        mask = batch["attention_mask"].bool()
        if dense_nll is not None:
            targets = scored_tokens(batch)
            num += (token_nll(logits, batch) - dense_nll)[targets].sum().item()
            den += int(targets.sum())
        else:
            num += (states[-1] - dense_h)[mask].pow(2).sum().item()
            den += dense_h[mask].pow(2).sum().item()
    return max(num / max(den, 1e-30), 0.0)


@torch.no_grad()
def fidelity(model: nn.Module, probe: Probe, on_batch: Callable[[torch.Tensor], None] | None = None) -> Fidelity:
    """``model``'s outputs on the probe's batches against the dense ones recorded in it (``on_batch(mask)``
    runs before each batch, for hooks that count real tokens only)."""
    cosines, err_num, err_den, agree, total, tokens = [], 0.0, 0.0, 0, 0, 0
    layer_num = layer_den = None
    nll_dense, nll_moe, scored = 0.0, 0.0, 0
    for index, (batch, dense_h, dense_pred, dense_nll) in enumerate(zip(probe.batches, probe.hidden, probe.predictions, probe.nll)):
        mask = batch["attention_mask"].bool()
        if on_batch is not None:
            on_batch(mask)
        states, logits = _outputs(model, batch)
        h = states[-1]
        cosines.append(nn.functional.cosine_similarity(mean_pool(h, mask), mean_pool(dense_h, mask), dim=-1))
        err_num += (h - dense_h)[mask].pow(2).sum().item()
        err_den += dense_h[mask].pow(2).sum().item()
        tokens += int(mask.sum())
        if probe.layers is not None:
            num = torch.stack([(a - b)[mask].pow(2).sum() for a, b in zip(states[1:], probe.layers[index])])
            den = torch.stack([b[mask].pow(2).sum() for b in probe.layers[index]])
            layer_num = num if layer_num is None else layer_num + num
            layer_den = den if layer_den is None else layer_den + den
        if dense_pred is not None:
            a, b = logits.argmax(-1), dense_pred
            if a.dim() == 2:  # per-token heads: count real tokens only
                a, b = a[mask], b[mask]
            agree += int((a == b).sum())
            total += a.numel()
        if dense_nll is not None:
            targets = scored_tokens(batch)
            nll_dense += dense_nll[targets].sum().item()
            nll_moe += token_nll(logits, batch)[targets].sum().item()
            scored += int(targets.sum())
    return Fidelity(
        texts=sum(len(b["input_ids"]) for b in probe.batches),
        tokens=tokens,
        embedding_cosine=float(torch.cat(cosines).mean()),
        hidden_rel_error=(err_num / max(err_den, 1e-30)) ** 0.5,
        head_agreement=agree / total if total else None,
        layer_rel_error=None if layer_num is None else [float(x) for x in (layer_num / layer_den.clamp_min(1e-30)).sqrt()],
        dense_perplexity=math.exp(nll_dense / scored) if scored else None,
        perplexity=math.exp(nll_moe / scored) if scored else None,
    )


def active_ffn_share(converted: list[MoEFeedForward], dense_ffn_size: int, num_layers: int) -> float:
    """Mean over all ``num_layers`` FFNs of the share of the dense FFN's neurons a token computes
    (layers left dense count as 1)."""
    used = sum(neuron_share(min(m.top_k, m.num_experts), m.expert_size, m.shared_size, dense_ffn_size) for m in converted)
    return (used + num_layers - len(converted)) / max(num_layers, 1)


def compare(
    model: nn.Module, probe: Probe, dense_ffn_size: int, num_layers: int, converted: list[MoEFeedForward] | None = None
) -> QuickReport:
    """Fidelity of ``model`` to the dense outputs in ``probe``; FLOPs and FFN share from its converted
    layers (``converted``: the MoE modules a native model was made from; default: ``model``'s own)."""
    f = fidelity(model, probe)
    if converted is None:
        converted = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    dense, moe = model_ffn_flops(converted, dense_ffn_size, num_layers)
    return QuickReport(
        texts=f.texts,
        tokens=f.tokens,
        embedding_cosine=f.embedding_cosine,
        hidden_rel_error=f.hidden_rel_error,
        head_agreement=f.head_agreement,
        ffn_flops_ratio=moe / dense if dense else 1.0,
        active_ffn_share=active_ffn_share(converted, dense_ffn_size, num_layers),
        dense_perplexity=f.dense_perplexity,
        perplexity=f.perplexity,
    )
