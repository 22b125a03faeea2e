"""The teacher and what the student trains: the frozen dense model sharing every weight the student
does not train (:func:`dense_teacher`, :func:`share_frozen`), and the parameters that learn
(:func:`trainable`)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ...evaluation.costs import is_sparse_block
from ...moe import MoEFeedForward
from ...recipe import Distill
from .gates import frozen_gates


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The MoE feed-forwards of ``model``: densetomoe's own, or a native model's sparse MoE blocks."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward) or is_sparse_block(m)]


def trainable(model: nn.Module, settings: Distill) -> list[nn.Parameter]:
    """The parameters that learn, marked so (``requires_grad``): the MoE layers' (``train: moe``), every
    weight but the embeddings and the output layer (``train: blocks``), or all of them (``train: all``).

    In a native MoE block the experts (and shared expert) learn; the routers learn only with
    ``gates: learn``, at their own rate, and the shared experts' gates never (see :mod:`.gates`).
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
    return learning - frozen_gates(model, settings)


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


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def check_apart(teacher: nn.Module, params: list[nn.Parameter]) -> None:
    """The teacher must not move as the student trains: it may share no weight the student trains."""
    trained = {_storage(p) for p in params}
    if any(_storage(p) in trained for p in teacher.parameters()):
        raise ValueError(
            "the teacher shares weights that the student trains (train: all needs a teacher of its own: "
            "make it with dense_teacher() before conversion, or share_frozen())"
        )
