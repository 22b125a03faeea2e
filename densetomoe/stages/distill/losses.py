"""The distillation losses (what :mod:`densetomoe.stages.distill` describes), and the KL of a causal
LM's logits computed through the output layer both models share, a chunk of tokens at a time."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from ...evaluation.quick import mean_pool
from ...moe import MoEFeedForward
from ...recipe import Distill


def losses(
    student_out,
    teacher_out,
    mask: torch.Tensor,
    settings: Distill,
    moe_modules: list[MoEFeedForward],
    head: nn.Linear | None = None,
) -> dict[str, torch.Tensor]:
    """The unweighted distillation losses of one batch (see the module docstring).

    With ``head`` (a causal LM's output layer, see :func:`fused_head`), the logits' KL is computed
    from both models' final hidden states by :func:`head_kl`, whatever logits the outputs hold.
    """
    real = mask.bool()
    present = mask.to(torch.float32)  # (batch, seq): a product, not a gather, picks the real tokens
    parts: dict[str, torch.Tensor] = {}
    pairs = list(zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:]))

    def squares(x: torch.Tensor) -> torch.Tensor:  # (batch, seq, hidden) -> sum of squares over real tokens
        return (x.float().pow(2).sum(-1) * present).sum()

    parts["hidden"] = torch.stack([squares(s.float() - t.float()) / squares(t).clamp_min(1e-12) for s, t in pairs]).mean()
    s_logits, t_logits = getattr(student_out, "logits", None), getattr(teacher_out, "logits", None)
    if head is not None:
        last_s, last_t = student_out.hidden_states[-1][real], teacher_out.hidden_states[-1][real]
        parts["logits"] = head_kl(last_s, last_t, head.weight, head.bias, settings.temperature)
    elif s_logits is not None:
        temperature = settings.temperature
        s_log = (s_logits.float() / temperature).log_softmax(-1)
        t_log = (t_logits.float() / temperature).log_softmax(-1)
        kl = (t_log.exp() * (t_log - s_log)).sum(-1)  # (batch, seq) or (batch,)
        parts["logits"] = (kl[real] if kl.dim() == 2 else kl).mean() * temperature**2
    else:
        s_pool = mean_pool(student_out.hidden_states[-1].float(), mask)
        t_pool = mean_pool(teacher_out.hidden_states[-1].float(), mask)
        parts["pooled"] = (1 - nn.functional.cosine_similarity(s_pool, t_pool, dim=-1)).mean()
    aux = [m.aux for m in moe_modules if getattr(m, "aux", None)]
    if aux:
        parts["balance"] = torch.stack([a["balance"] for a in aux]).mean()
        parts["router"] = torch.stack([a["router"] for a in aux]).mean()
    return parts


class _HeadKL(torch.autograd.Function):
    """``T^2 * mean_tokens KL(softmax(W t / T) || softmax(W s / T))`` and its gradient with respect to
    the student's states ``s``, a chunk of tokens at a time (see :func:`head_kl`)."""

    @staticmethod
    def forward(ctx, student, teacher, weight, bias, temperature: float, chunk: int):
        n, device = len(student), student.device
        # Under autocast, the products run in its dtype; the head is cast once, not once per chunk
        # (autocast caches the casts of trained weights only).
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
        grad = torch.empty(student.shape, dtype=torch.float32, device=device)  # (tokens, hidden)
        kl = torch.zeros((), dtype=torch.float32, device=device)
        with torch.autocast(device.type, enabled=False):
            weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)

            def log_probs(states: torch.Tensor) -> torch.Tensor:  # (chunk, hidden) -> (chunk, vocab)
                logits = nn.functional.linear(states.to(dtype), weight, bias).float()
                return (logits if temperature == 1 else logits.div_(temperature)).log_softmax(-1)

            for start in range(0, n, chunk):
                rows = slice(start, start + chunk)
                log_q, log_p = log_probs(student[rows]), log_probs(teacher[rows])
                p = log_p.exp()
                kl += log_p.sub_(log_q).mul_(p).sum()  # in log_p's memory, as each chunk's tensors are reused
                # d loss / d logits_s = T^2 / n * (q - p) / T, formed in log_q's memory
                grad[rows] = log_q.exp_().sub_(p).mul_(temperature / n).to(dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.dtype = student.dtype
        return kl * temperature**2 / max(n, 1)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.dtype), None, None, None, None, None


def head_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk: int = 128,
) -> torch.Tensor:
    """The logits' distillation loss from final hidden states ``(tokens, hidden)`` through a frozen
    output layer: ``T^2`` times the mean over tokens of ``KL(teacher || student)`` of
    ``softmax(linear(h, weight, bias) / T)``.

    The same value and gradient as the KL on a causal LM's logits, without ever holding a
    ``(tokens, vocab)`` tensor: each chunk of tokens gets its logits, its KL and its gradient with
    respect to the student's states (``(q - p) W T / n``) at once, and only that gradient, the size of
    the states, waits for the backward pass. With a vocabulary of 49,152, a batch of 2,048 tokens
    otherwise holds several 400 MB tensors, and on a CPU filling them cost as much as the rest of a
    training step. (Liger-Kernel fuses the output layer with its losses the same way.)
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("head_kl takes a frozen output layer")
    return _HeadKL.apply(student, teacher.detach(), weight, bias, temperature, chunk)


def fused_head(
    student: nn.Module, teacher: nn.Module, probe: torch.Tensor, precision: Callable[[], AbstractContextManager] = nullcontext
) -> nn.Linear | None:
    """The output layer that :func:`head_kl` can compute both models' logits with, or None.

    That is a frozen ``nn.Linear`` the two models share (``train: moe``), in models whose forward
    takes ``logits_to_keep`` (so that their own logits need not be computed) and whose logits are
    exactly ``head(hidden_states[-1])``. The last is checked on ``probe`` token ids ``(1, tokens)``,
    not assumed: a family that scales or caps its logits, or whose last hidden state is not the
    head's input, keeps the KL on its own logits. The check runs under ``precision`` (training's
    autocast), as both the models and the head will: a student that accelerate prepared for mixed
    precision autocasts its own forward, so its logits are only comparable to a head run the same way.
    """
    heads = [m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None for m in (student, teacher)]
    head = heads[0]
    if not all(isinstance(h, nn.Linear) for h in heads) or any(p.requires_grad for p in head.parameters()):
        return None
    if heads[1].weight is not head.weight or heads[1].bias is not head.bias:
        return None
    for model in (student, teacher):
        if "logits_to_keep" not in inspect.signature(model.forward).parameters:
            return None
        with torch.no_grad(), precision():
            out = model(input_ids=probe, output_hidden_states=True)
            logits, states = getattr(out, "logits", None), getattr(out, "hidden_states", None)
            if logits is None or states is None:
                return None
            again = head(states[-1])
        if again.shape != logits.shape or not torch.allclose(again.float(), logits.float(), rtol=1e-4, atol=1e-4):
            return None
    return head


def total(parts: dict[str, torch.Tensor], settings: Distill) -> torch.Tensor:
    weights = {
        "hidden": settings.hidden_loss,
        "logits": settings.logits_loss,
        "pooled": settings.pooled_loss,
        "balance": settings.balance_loss,
        "router": settings.router_loss,
    }
    return sum(weights[name] * value for name, value in parts.items())
