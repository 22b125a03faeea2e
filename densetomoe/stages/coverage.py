"""Dynamic top-k's coverage, the one place it is set: at conversion from the calibration sample
(:func:`coverage_for`), and again after training (:func:`reset_coverage`), where the routers and what
reaches them have moved. :class:`~densetomoe.moe.MoEFeedForward` applies it (``coverage_values``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..ffn import CHUNK
from ..moe import Router, Routing, coverage_values, moe_modules, set_top_k
from .calibrate import calibration_batches, real_token_inputs


@torch.no_grad()
def coverage_for(router: Router, sample: torch.Tensor, top_k: int, ramp: float = 0.0) -> float:
    """Dynamic top-k's coverage at which the tokens of ``sample`` take ``top_k`` experts on average
    (with a soft boundary's ``ramp``, counting the experts taken in part).

    A token takes an expert when that expert's coverage value (:func:`~densetomoe.moe.coverage_values`:
    without a ramp, the router probability of the experts ranked before it) is below the coverage, so
    the number of (token, expert) pairs taken at coverage ``c`` is the count of values below ``c``,
    over all tokens: the coverage lies midway between the ``top_k * tokens``-th smallest of them and
    the next (midway: a soft boundary's threshold at the next value itself is solved only to rounding).
    """
    values = torch.cat([coverage_values(router(part).float().softmax(-1), ramp).reshape(-1) for part in sample.split(CHUNK)])
    pairs = top_k * len(sample)
    if pairs >= len(values):
        return 1.0 + 1e-6  # every expert (the probability before the last is below 1)
    below, above = values.kthvalue(pairs).values, values.kthvalue(pairs + 1).values
    return float((below + above) / 2)


COVERAGE_TOKENS = 16384  # calibration tokens per layer on which dynamic top-k's coverage is set again after training


@torch.no_grad()
def reset_coverage(model: nn.Module, tokenizer, texts: list[str], seq_len: int, batch_size: int, tokens: int = COVERAGE_TOKENS) -> dict[int, tuple[float, float]]:
    """Dynamic top-k after training: each layer's coverage set again so that ``tokens`` calibration
    tokens take the layer's ``top_k`` experts on average, as conversion set it (:func:`coverage_for`).

    Training moves the routers and what reaches them, so the coverage chosen before training no
    longer gives the budget: on SmolLM2 at half the FFN, 30 minutes of distillation took the held-out
    mean from 128 experts of 256 to 130. Returns ``{layer: (experts per token before, after)}`` on
    those tokens; layers with a fixed top-k are left alone."""
    modules = {i: m for i, m in moe_modules(model).items() if m.coverage}
    if not modules:
        return {}
    mask: dict[str, torch.Tensor] = {}
    samples: dict[int, list[torch.Tensor]] = {i: [] for i in modules}
    handles = [m.register_forward_pre_hook(real_token_inputs(samples[i].append, mask)) for i, m in modules.items()]
    device = next(model.parameters()).device
    try:
        for batch in calibration_batches(tokenizer, texts, seq_len, batch_size, tokens):
            mask["tokens"] = batch["attention_mask"].bool().to(device)
            model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
    sample = {i: torch.cat(samples.pop(i))[:tokens] for i in modules}
    taken = lambda i: float(modules[i].selection(sample[i]).sum(-1).mean())  # noqa: E731
    before = {i: taken(i) for i in modules}
    set_top_k(model, {i: Routing(m.top_k, coverage_for(m.router, sample[i], m.top_k, m.ramp)) for i, m in modules.items()})
    return {i: (before[i], taken(i)) for i in modules}


def hold_the_budget(model: nn.Module, tokenizer, texts: list[str], seq_len: int, batch_size: int, log: Callable[[str], None]) -> None:
    """After distillation, the coverage set again on calibration ``texts`` (:func:`reset_coverage`), so
    that tokens take each layer's top-k experts on average, as the FLOPs are counted; says so in ``log``."""
    changed = reset_coverage(model, tokenizer, texts, seq_len, batch_size)
    if changed:
        before, after = (sum(pair[n] for pair in changed.values()) / len(changed) for n in (0, 1))
        log(f"dynamic top-k after training: {before:.1f} -> {after:.1f} experts per token on calibration text (coverage set again)")
