"""FSDP shards the student in place: it comes back whole, as a new module filled into a copy of its
structure taken before training (:func:`skeleton`, :func:`unsharded`)."""

from __future__ import annotations

import copy

import torch
from torch import nn


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
