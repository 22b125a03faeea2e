"""Evaluation metrics as pure library functions (no files, no printing)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Perplexity:
    value: float  # exp(mean negative log-likelihood per scored token)
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # tokens scored (each exactly once)
    windows: int
    window: int
    stride: int
    add_bos: bool


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` starts an encoded text with its BOS token: the family's own convention
    (LLaMA 1-2, Mistral, Gemma, Phi-3 and OPT do; GPT-2, Qwen and SmolLM2 do not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


@torch.no_grad()
def perplexity(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    tokenizer,
    texts: list[str],
    window: int = 512,
    stride: int = 256,
    add_bos: bool | None = None,
    max_tokens: int | None = None,
    separator: str = "\n\n",
) -> Perplexity:
    """Perplexity of a causal LM on ``texts`` joined by ``separator``, by sliding windows.

    The text is tokenized once, without special tokens, and cut to ``max_tokens``. Windows of
    ``window`` tokens start every ``stride`` tokens; each window scores only the tokens that no
    earlier window scored, so every token is scored once and, after the first window, with at least
    ``window - stride`` tokens of context (``stride < window``: a window's first token is context
    only, so windows overlap by at least one token; "perplexity of fixed-length models", as in the transformers
    documentation). With ``add_bos`` (default: what the tokenizer does, see :func:`adds_bos`) every
    window starts with the BOS token, which takes one of its ``window`` positions, and the text's first
    token is scored given BOS alone; without it the text's first token is context only.

    ``model`` is a causal LM module, or any function from a window's token ids ``(len,)`` to its
    logits ``(len, vocab)``: another engine (llama.cpp: :func:`densetomoe.llamacpp.scorer`) is
    measured on exactly the same windows.

    PPL = exp(-1/N sum_t log p(x_t | x_<t within its window)).
    """
    if not 0 < stride < window:
        raise ValueError(f"stride must be in 1..{window - 1} (less than the window), got {stride}")
    if add_bos is None:
        add_bos = adds_bos(tokenizer)
    if add_bos and tokenizer.bos_token_id is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token")
    ids = tokenizer(separator.join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)  # (n,)
    span = window - 1 if add_bos else window  # text tokens per window
    if span < 1 or len(ids) < 2:
        raise ValueError("not enough text or window too small to score any token")
    if isinstance(model, nn.Module):
        device = next(model.parameters()).device
        logits_of = lambda chunk: model(input_ids=chunk.unsqueeze(0).to(device)).logits[0]  # noqa: E731
    else:
        device, logits_of = torch.device("cpu"), model
    total, scored, windows, done = 0.0, 0, 0, 0  # done: text tokens scored (or, first window, context) so far
    begin = 0
    while done < len(ids):
        end = min(begin + span, len(ids))
        chunk = ids[begin:end]
        new = end - done if done else (end if add_bos else end - 1)  # tokens this window scores: the last `new`
        if add_bos:
            chunk = torch.cat([torch.tensor([tokenizer.bos_token_id]), chunk])
        logits = logits_of(chunk)[:-1].float()  # (len - 1, vocab)
        targets = chunk[1:].to(device)
        nll = nn.functional.cross_entropy(logits[-new:], targets[-new:], reduction="sum")
        total, scored, windows, done = total + nll.item(), scored + new, windows + 1, end
        begin += stride
    mean = total / scored
    return Perplexity(math.exp(mean), mean, scored, windows, window, stride, add_bos)


def chrf_bleu(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus chrF (Popovic 2015: F-score of character n-grams, n <= 6, beta = 2) and BLEU (Papineni et
    al. 2002; 13a tokenisation), 0-100, of ``hypotheses`` against one reference each, as sacrebleu
    computes them (its default settings, so the figures compare with published ones)."""
    try:
        import sacrebleu
    except ImportError:
        from ..errors import UsageError

        raise UsageError("translation suites score with sacrebleu: pip install sacrebleu") from None
    return {
        "chrf": float(sacrebleu.corpus_chrf(hypotheses, [references]).score),
        "bleu": float(sacrebleu.corpus_bleu(hypotheses, [references]).score),
    }


class ExpertLoad:
    """Counts, per hooked module (a router or an MoE layer), how many real tokens each expert receives,
    and how many real tokens there were. ``chosen(module, args, output)`` gives a forward's
    ``(tokens, experts)`` choice (non-zero where a token takes an expert); ``set_mask`` names the
    real tokens of the next batch (padding is not counted)."""

    def __init__(self, modules: list[nn.Module], experts: list[int], chosen: Callable[[nn.Module, tuple, object], torch.Tensor]):
        self.counts = [torch.zeros(n) for n in experts]
        self.tokens = [0] * len(modules)
        self.mask: torch.Tensor | None = None
        self.chosen = chosen
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, index: int) -> Callable:
        def record(module, args, output):
            choice = self.chosen(module, args, output)
            if self.mask is not None:
                choice = choice[self.mask.reshape(-1)]
            self.tokens[index] += len(choice)
            self.counts[index] += (choice > 0).sum(0).float().cpu()  # a soft boundary's part-expert counts whole

        return record

    def set_mask(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def close(self) -> None:
        for h in self.handles:
            h.remove()
