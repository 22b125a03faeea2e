"""Recover quality by distilling an MoE model from the dense model it was cut from.

The student (the MoE model) learns to reproduce the frozen teacher (the dense original) on unlabelled
text. The loss per step is a weighted sum of

* ``hidden``: per-layer hidden-state error, ``sum ||h_s - h_t||^2 / sum ||h_t||^2`` over real tokens,
  averaged over the transformer blocks (layer-wise distillation, as MoEBERT does);
* ``logits``: ``KL(teacher || student)`` of the output distributions, where the model has a head or
  is a causal LM (temperature ``T``, scaled by ``T^2``);
* ``pooled``: ``1 - cosine`` of mean-pooled outputs, for a bare encoder (a sentence-embedding model);
* ``balance`` and ``router``: each MoE layer's Switch load-balancing loss and its router's
  cross-entropy to the experts' measured output shares (see :class:`~densetomoe.moe.MoEFeedForward`).

How the router learns. The forward stays what inference computes, an *unweighted* sum of the
selected experts, so that a distilled model needs no gate weights and the dense equivalence at
``top_k == experts`` holds. Gradients reach the router two ways: a straight-through gate
``1 + p - stopgrad(p)`` on each selected expert (the end-to-end signal: does more of this expert help
the loss?) and the router loss, which keeps it ranking experts by what they actually contribute as
the experts change. A straight-through gate was chosen over learned gate weights because gate
weights change the function the experts were cut from and must first be learned back to 1.

The teacher holds no second copy of what the student does not train. With ``train: moe`` (the
default) attention, embeddings, norms and the layers left dense are frozen, so teacher and student
share them: :func:`dense_teacher` makes the teacher before conversion changes the dense model, as a
second module tree over the very same parameters, and keeps the dense FFNs that the MoE modules
replace; :func:`share_frozen` does the same for a teacher loaded apart from its student. Memory is
one model plus its dense FFNs, not two models. With ``train: all`` every weight learns and the
teacher is a full copy; :func:`distill_model` refuses a teacher that shares a weight the student
trains. ``train: blocks`` sits between them: every weight but the embeddings and the output layer
learns (attention and norms may then make up for what the split lost), and the teacher shares
those, so that the KL still goes through the one output layer.

A causal LM reads its text as it was pretrained: the documents joined into one token stream, cut
into windows of ``seq_len`` (:func:`~densetomoe.data.packed`), so that every position of a batch is
a token to learn from (documents cut to ``seq_len`` and padded to the longest left about half of
each SmolLM2 batch padding); its held-out points are scored on windows too. Its logits' KL is
computed from the final hidden states through the output layer that student and teacher share
(:func:`head_kl`), a chunk of tokens at a time. An encoder reads each document alone.

Training runs through ``accelerate``: one CPU process by default, the same code under
``accelerate launch`` on several GPUs or machines, mixed precision where the hardware has it.
FSDP shards the student in place; it comes back whole, as a new module filled into a copy of its
structure taken before training (:func:`skeleton`, :func:`unsharded`), which is why
:func:`distill_model` returns the student it trained. Budgets are steps and/or wall-clock minutes;
checkpoints (``accelerate`` state plus the loss history) let ``resume`` continue an interrupted run
with the same budget.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import memory
from ..archs import Arch
from ..console import progress
from ..data import encode, load_texts, missing_file, packed
from ..errors import UsageError
from ..moe import MoEFeedForward, Routing, moe_modules, set_top_k
from ..recipe import Distill
from .calibrate import calibration_batches, real_token_inputs
from .evaluate import mean_pool, next_token_nll
from .router import coverage_for

STATE_FILE = "densetomoe_distill_state.json"
CALIBRATION_TEXT = "calibration"  # a source in Distill.data: the text the folder was calibrated on
KEEP_CHECKPOINTS = 2


@dataclass
class History:
    """The loss curve: one point every ``log_every`` steps, a held-out point every ``eval_every``."""

    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)
    held_out: list[dict] = field(default_factory=list)  # {step, seconds, loss[, perplexity]}
    dense_perplexity: float | None = None  # causal LM: the teacher's on the same held-out texts
    step: int = 0
    elapsed: float = 0.0  # training seconds, over all resumed runs
    tokens: int = 0  # real tokens trained on
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> History:
        return cls(**data)


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


def _allow_precision(mixed_precision: str) -> None:
    """accelerate keeps one state per process and refuses a second ``Accelerator`` with another mixed
    precision; a process that distils twice (a notebook, a test run) starts the second afresh."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()


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


def lr_factor(step: int, elapsed: float, settings: Distill) -> float:
    """Linear warm-up, then cosine decay to ``final_lr`` (a fraction of the peak) over whichever budget
    (steps or minutes) runs out first."""
    if step < settings.warmup:
        return (step + 1) / (settings.warmup + 1)
    done = 0.0
    if settings.steps:
        done = max(done, (step - settings.warmup) / max(settings.steps - settings.warmup, 1))
    if settings.minutes:
        done = max(done, elapsed / (settings.minutes * 60))
    end = settings.final_lr
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def _finished(history: History, settings: Distill) -> bool:
    if settings.steps is not None and history.step >= settings.steps:
        return True
    return settings.minutes is not None and history.elapsed >= settings.minutes * 60


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The MoE feed-forwards of ``model``: densetomoe's own, or a native model's sparse MoE blocks."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward) or _native_block(m)]


def _native_block(module: nn.Module) -> bool:
    return type(module).__name__.endswith("SparseMoeBlock") and hasattr(module, "experts") and hasattr(module, "gate")


def trainable(model: nn.Module, settings: Distill) -> list[nn.Parameter]:
    """The parameters that learn, marked so (``requires_grad``): the MoE layers' (``train: moe``), every
    weight but the embeddings and the output layer (``train: blocks``), or all of them (``train: all``).

    In a native MoE block the experts (and shared expert) learn and the gates stay frozen: their
    weights are scaled down so that the softmax is uniform (see :mod:`.stages.native`), and an
    optimizer step sized for ordinary weights would undo that.
    """
    learning = _learning(model, settings)
    for p in model.parameters():
        p.requires_grad_(id(p) in learning)
    return [p for p in model.parameters() if p.requires_grad]


def _learning(model: nn.Module, settings: Distill) -> set[int]:
    """The ids of the parameters of ``model`` that ``settings.train`` lets learn (see :func:`trainable`)."""
    if settings.train == "moe":
        learning = {id(p) for m in moe_blocks(model) for p in m.parameters()}
    else:
        learning = {id(p) for p in model.parameters()}
        if settings.train == "blocks":
            learning -= {id(p) for p in _embeddings(model)}
    for m in moe_blocks(model):
        if _native_block(m):
            learning -= {id(p) for p in m.gate.parameters()}
            if hasattr(m, "shared_expert_gate"):
                learning -= {id(p) for p in m.shared_expert_gate.parameters()}
    return learning


def _embeddings(model: nn.Module) -> list[nn.Parameter]:
    """The input embeddings' and the output layer's parameters (one matrix where they are tied)."""
    found = [getattr(model, get)() for get in ("get_input_embeddings", "get_output_embeddings") if hasattr(model, get)]
    return [p for m in found if m is not None for p in m.parameters()]


def dense_teacher(dense: nn.Module, settings: Distill) -> nn.Module:
    """The frozen teacher of a student about to be made from ``dense``: call it *before* conversion
    swaps MoE modules into ``dense`` (remote code) or builds the native model on its parameters.

    ``train: moe``: a second module tree over the very same parameters (``deepcopy`` with every
    parameter in its memo: modules, buffers and config are copied, no weight is). The student keeps
    the attention, embeddings, norms and dense layers it shares with the teacher, frozen; the
    teacher alone then holds the dense FFNs that the MoE modules replace. Sharing the ``Parameter``
    objects, not just their storage, keeps the two one model wherever they go: ``.to(device)``
    replaces a parameter's data in place, so moving the student to a GPU moves the teacher's shared
    weights too, and moving the teacher after it moves nothing twice.

    This was chosen over swapping the dense FFNs back into the student for each teacher forward:
    the teacher stays an ordinary module with its own eval mode and no student surgery mid-step
    (an ``accelerate``-wrapped student, an exception in the forward), and :func:`distill_model`
    treats every teacher alike. Both cost the same memory.

    ``train: blocks``: the same over the embeddings and the output layer alone, the rest copied.
    ``train: all``: a full copy, since the student trains every weight and the teacher must not move.
    """
    if settings.train == "all":
        return copy.deepcopy(dense)
    shared = _embeddings(dense) if settings.train == "blocks" else dense.parameters()
    return copy.deepcopy(dense, memo={id(p): p for p in shared})


def share_frozen(teacher: nn.Module, student: nn.Module, settings: Distill) -> nn.Module:
    """``teacher``, loaded apart from ``student`` (``densetomoe distill`` on a folder), sharing with it
    exactly what the student will not train.

    Each teacher parameter that equals the student's parameter of the same name (shape, dtype,
    device and every value) and that the student will not train (:func:`trainable`: outside the MoE
    layers with ``train: moe``, the embeddings and output layer with ``train: blocks``, none with
    ``train: all``) becomes that very parameter, and the teacher's own copy is freed; whatever differs
    (a folder trained with ``train: all``, another dtype) keeps its own copy, so the teacher stays the
    dense model. A teacher that already shares a weight the student will train (a native model built
    on the dense one's parameters) first gets a copy of its own.
    """
    learning = _learning(student, settings)
    trained = {_storage(p) for p in student.parameters() if id(p) in learning}
    if any(_storage(p) in trained for p in teacher.parameters()):
        teacher = copy.deepcopy(teacher)
    theirs = {name: p for name, p in student.named_parameters(remove_duplicate=False) if id(p) not in learning}
    for name, param in list(teacher.named_parameters(remove_duplicate=False)):  # tied names each
        other = theirs.get(name)
        if other is not None and other is not param and _equal(param, other):
            owner, _, leaf = name.rpartition(".")
            setattr(teacher.get_submodule(owner), leaf, other)
    return teacher


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


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its parameters on the meta device (no memory; ties kept), its buffers
    and everything else copied: what :func:`unsharded` fills again. Taken before FSDP shards
    ``model``, since a sharded module cannot be copied, and any model, a dense one whose FFNs were
    swapped for MoE layers too, has one (a class rebuilt from its config would be the dense model)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad) for p in model.parameters()}
    for module in model.modules():  # what a forward left with its graph (an MoE layer's aux losses) cannot be copied
        for value in vars(module).values():
            for t in value.values() if isinstance(value, dict) else [value]:
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    memo[id(t)] = t.detach()
    return copy.deepcopy(model, memo)


def unsharded(model: nn.Module, device: torch.device | str, like: nn.Module) -> nn.Module:
    """``model`` as an ordinary module on ``device`` when FSDP2 sharded it (``accelerate launch`` with an
    FSDP config), else ``model`` itself.

    A sharded model keeps FSDP's hooks, which gather its parameters on the accelerator for every
    forward: evaluation and export need the plain model again. Each parameter is gathered whole, one
    at a time, straight to ``device``, in every process (each goes on to evaluate), into ``like``, the
    model's :func:`skeleton` taken before it was sharded."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not isinstance(model, FSDPModule):
        return model
    whole: dict[int, torch.Tensor] = {}  # a tensor under two names (a tied head) is gathered once

    def gathered(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in whole:
            whole[id(t)] = (t.full_tensor() if isinstance(t, DTensor) else t).to(device)
        return whole[id(t)]

    return filled(like, {name: gathered(t) for name, t in model.state_dict().items()}, device)


def filled(like: nn.Module, state: dict[str, torch.Tensor], device: torch.device | str) -> nn.Module:
    """``like`` (a :func:`skeleton`) with ``state`` as its parameters and buffers, on ``device``; a
    parameter it holds under several names (a tied head) is one parameter again."""
    names: dict[int, list[str]] = {}
    for name, p in like.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    like.load_state_dict(state, assign=True)
    for first, *others in names.values():
        for other in others:
            owner, _, attr = other.rpartition(".")
            setattr(like.get_submodule(owner), attr, like.get_parameter(first))
    return like.to(device)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _check_apart(teacher: nn.Module, params: list[nn.Parameter]) -> None:
    """The teacher must not move as the student trains: it may share no weight the student trains."""
    trained = {_storage(p) for p in params}
    if any(_storage(p) in trained for p in teacher.parameters()):
        raise ValueError(
            "the teacher shares weights that the student trains (train: all needs a teacher of its own: "
            "make it with dense_teacher() before conversion, or share_frozen())"
        )


def _tokenize(tokenizer, seq_len: int):
    """A DataLoader collate function: the batches that calibration and evaluation use."""
    return lambda texts: dict(encode(tokenizer, texts, seq_len))


def _windows(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DataLoader collate function for windows of :func:`~densetomoe.data.packed` text."""
    ids = torch.stack(rows)  # (batch, seq_len)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _checkpoints(workdir: Path) -> list[Path]:
    """The checkpoints in ``workdir``, oldest first."""
    return sorted(workdir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(workdir: Path) -> Path | None:
    found = _checkpoints(workdir)
    return found[-1] if found else None


def training_texts(data: str | list[str] | None, calibration_texts: list[str]) -> list[str]:
    """The documents ``Distill.data`` names: one source or several in turn, each a file or dataset as
    :func:`~densetomoe.data.load_texts` reads it, or :data:`CALIBRATION_TEXT` for ``calibration_texts``
    (None: those alone)."""
    texts: list[str] = []
    for source in _sources(data):
        texts += calibration_texts if source == CALIBRATION_TEXT else load_texts(source)
    return texts


def check_sources(data: str | list[str] | None) -> None:
    """Refuse a distillation text file that is not there before any heavy work (not after the conversion)."""
    for source in _sources(data):
        if source != CALIBRATION_TEXT and missing_file(source):
            raise UsageError(f"distillation text {source} does not exist")


def _sources(data: str | list[str] | None) -> list[str]:
    return [CALIBRATION_TEXT] if data is None else [data] if isinstance(data, str) else list(data)


def distill_model(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    settings: Distill,
    arch: Arch | None,
    default_texts: list[str],
    held_out_texts: list[str],
    *,
    workdir: Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
    seed: int = 0,
) -> tuple[nn.Module, History]:
    """Train ``student`` to match ``teacher``; returns the trained student and the loss history.

    The student comes back as an ordinary module on the device it came from: ``student`` itself,
    trained in place, or, where ``accelerate launch`` sharded it with FSDP (which turns the module
    into a sharded one in place), a plain copy of it gathered whole (:func:`unsharded`). Go on with
    the returned module, not with ``student``.

    ``teacher`` is frozen and put in eval mode here; it may share any weight the student does not
    train (:func:`dense_teacher`, :func:`share_frozen`), and none that it does.

    ``default_texts`` (the calibration text) are used when ``settings.data`` is None or names them
    (:func:`training_texts`); ``held_out_texts`` give the held-out points of the curve and are removed
    from the training text. With ``workdir``, checkpoints are written there every
    ``settings.checkpoint_every`` steps and removed once training has finished.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed

    texts = training_texts(settings.data, default_texts)
    unseen = set(held_out_texts)
    texts = [t for t in texts if t not in unseen]  # the held-out points must stay held out
    if not texts:
        raise UsageError("distillation has no training text")
    # One batch of ``settings.batch_size`` texts per step, split between the processes of an
    # ``accelerate launch``: every process takes the same number of steps (uneven shards of a small
    # text would leave one process waiting in a collective for ever), and N processes train as one.
    # An expert that no token of a process's share picked has no gradient there: DDP must expect that.
    _allow_precision(settings.mixed_precision)
    accelerator = Accelerator(
        mixed_precision=settings.mixed_precision,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if settings.batch_size % accelerator.num_processes:
        raise UsageError(f"distillation batch size {settings.batch_size} does not split between {accelerator.num_processes} processes")
    set_seed(seed)
    home = next(student.parameters()).device
    like = skeleton(student)  # should FSDP shard the student: what it turns back into, after training
    params = trainable(student, settings)
    _check_apart(teacher, params)
    moe_modules = moe_blocks(student)
    if not moe_modules:
        raise UsageError("the model has no MoE layers to distill")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    windows = arch is not None and arch.decoder  # read as causal LMs are trained: windows of one token stream
    if windows:
        data, collate = list(packed(tokenizer, texts, settings.seq_len)), _windows
    else:  # an encoder reads each document alone
        data, collate = texts, _tokenize(tokenizer, settings.seq_len)
    loader = torch.utils.data.DataLoader(
        data, batch_size=settings.batch_size, shuffle=True, drop_last=len(data) > settings.batch_size,
        collate_fn=collate, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    teacher.to(accelerator.device).eval().requires_grad_(False)
    head = None  # the output layer the KL goes through, where that is exact (a causal LM's)
    if windows:
        head = fused_head(accelerator.unwrap_model(student), teacher, data[0][None, :16].to(accelerator.device), accelerator.autocast)
    keep = {"logits_to_keep": 1} if head is not None else {}  # the KL then needs no logits
    held_out_data = held_out_texts[: settings.eval_texts]
    if held_out_data and windows:  # read the way training reads
        held_out_data = list(packed(tokenizer, held_out_data, settings.seq_len))
    held_out = [
        {k: v.to(accelerator.device) for k, v in batch.items()}
        for batch in torch.utils.data.DataLoader(held_out_data, batch_size=settings.batch_size, collate_fn=collate)
    ] if settings.eval_texts else []  # fmt: skip

    history = History(settings=settings.model_dump(mode="json"))
    if resume:
        checkpoint = latest_checkpoint(workdir) if workdir else None
        if checkpoint is None:
            raise UsageError(f"--resume: no checkpoint in {workdir}")
        accelerator.load_state(str(checkpoint))
        history = History.from_dict(json.loads((checkpoint / STATE_FILE).read_text()))
        history.settings = settings.model_dump(mode="json")
        log(f"resumed from {checkpoint} at step {history.step} ({history.elapsed / 60:.1f} min trained)")

    def set_mode(training: bool) -> None:
        student.eval()  # dense parts: no dropout, the teacher's behaviour
        for m in moe_modules:
            m.train(training)
            m.expert_dropout = settings.expert_dropout if training else 0.0

    def evaluate_held_out() -> None:
        if not held_out:
            return
        set_mode(False)
        point = {"step": history.step, "seconds": round(history.elapsed, 1)}
        loss_sum, nll_sum, dense_nll_sum, count = 0.0, 0.0, 0.0, 0
        with torch.no_grad(), accelerator.autocast():
            for batch in held_out:
                t_out = teacher(**batch, output_hidden_states=True)
                s_out = student(**batch, output_hidden_states=True)
                parts = losses(s_out, t_out, batch["attention_mask"], settings, [])
                loss_sum += float(total(parts, settings))
                if arch is not None and arch.decoder:
                    targets = batch["attention_mask"][:, 1:].bool()
                    nll_sum += float(next_token_nll(s_out.logits, batch["input_ids"])[targets].sum())
                    dense_nll_sum += float(next_token_nll(t_out.logits, batch["input_ids"])[targets].sum())
                    count += int(targets.sum())
        point["loss"] = loss_sum / len(held_out)
        if count:
            point["perplexity"] = math.exp(nll_sum / count)
            history.dense_perplexity = math.exp(dense_nll_sum / count)
        history.held_out.append(point)
        set_mode(True)

    if not history.held_out:
        evaluate_held_out()
    set_mode(True)
    window: dict[str, list[float]] = {}
    on_cpu = accelerator.device.type == "cpu"  # each step allocates what the last one freed: keep it (see memory)
    with progress(show_progress and accelerator.is_local_main_process) as bar, memory.reuse_freed_memory() if on_cpu else nullcontext():
        total_units = settings.steps if settings.steps is not None else int(settings.minutes * 60)
        task = bar.add_task("distilling", total=total_units)
        while not _finished(history, settings):
            for batch in loader:
                started = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = settings.lr * lr_factor(history.step, history.elapsed, settings)
                with torch.no_grad(), accelerator.autocast():
                    t_out = teacher(**batch, output_hidden_states=True, **keep)
                with accelerator.autocast():
                    s_out = student(**batch, output_hidden_states=True, **keep)
                    parts = losses(s_out, t_out, batch["attention_mask"], settings, moe_modules, head)
                    loss = total(parts, settings)
                if not torch.isfinite(loss):
                    raise UsageError(f"distillation diverged at step {history.step} (loss {loss.item()}); lower lr")
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                history.step += 1
                history.elapsed += time.perf_counter() - started
                history.tokens += int(accelerator.gather(batch["attention_mask"].sum().reshape(1)).sum())
                for name, value in [("loss", loss), *parts.items()]:
                    window.setdefault(name, []).append(float(value.detach()))
                if history.step % settings.log_every == 0:
                    _log_point(history, window)
                done = history.step if settings.steps is not None else int(history.elapsed)
                bar.update(task, completed=min(done, total_units), description=f"distilling loss {loss.item():.4f}")
                if history.step % settings.eval_every == 0:
                    evaluate_held_out()
                if workdir is not None and history.step % settings.checkpoint_every == 0:
                    _save(accelerator, workdir, history)
                if _finished(history, settings):
                    break
    if window:
        _log_point(history, window)
    if not history.held_out or history.held_out[-1]["step"] != history.step:
        evaluate_held_out()
    set_mode(False)
    student = unsharded(accelerator.unwrap_model(student), home, like)
    student.eval().requires_grad_(False).to(home)
    teacher.to(home)
    accelerator.wait_for_everyone()
    if workdir is not None and accelerator.is_main_process:
        shutil.rmtree(workdir, ignore_errors=True)  # finished: nothing left to resume
    log(
        f"distilled {history.step} steps, {history.tokens:,} tokens in {history.elapsed / 60:.1f} min; "
        f"held-out loss {history.held_out[0]['loss']:.4f} -> {history.held_out[-1]['loss']:.4f}"
        if history.held_out
        else f"distilled {history.step} steps in {history.elapsed / 60:.1f} min"
    )
    return student, history


def _log_point(history: History, window: dict[str, list[float]]) -> None:
    if not window.get("loss"):
        return
    history.steps.append(history.step)
    history.seconds.append(round(history.elapsed, 2))
    history.loss.append(sum(window["loss"]) / len(window["loss"]))
    for name, values in window.items():
        if name != "loss":
            history.parts.setdefault(name, []).append(sum(values) / len(values))
    window.clear()


def _save(accelerator, workdir: Path, history: History) -> None:
    """An ``accelerate`` state (weights, optimizer, RNG) plus the history; the oldest are pruned."""
    folder = workdir / f"checkpoint-{history.step}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        (folder / STATE_FILE).write_text(json.dumps(history.as_dict()))
        for path in _checkpoints(workdir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(path, ignore_errors=True)
