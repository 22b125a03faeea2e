"""A native MoE block's router while it is distilled: what the engines compute, and how it learns.

**The engines' routing.** llama.cpp keeps a qwen2_moe router (``ffn_gate_inp``) in float32 and ranks
the experts by the float32 softmax of float32 logits. transformers' router is one ``F.linear``, so
under bfloat16 autocast its logits would be rounded to 8 bits before the ranking: with the near
uniform softmax of a converted folder (logit spread below 2^-6, see
:mod:`densetomoe.formats.qwen_moe`) that would change which expert a share of the tokens gets, and
the student would learn under a routing that no engine runs. :func:`engine_routing` runs every native
router in float32 for the length of the training, whatever the autocast.

**Learning the router** (``gates: learn``). A converted router's weights are scaled down by a power of
two so that its softmax is uniform; an optimizer step sized for ordinary weights (AdamW moves each
weight by about ``lr`` a step, whatever its size) would wipe that ranking out in one step. So each
router learns at the rate its own experts learn *relative to their size*: ``lr x rms(router) /
rms(experts)`` (:func:`param_groups`). Under the engines' math a token's output is ``p_e(x) E_e(x)``
for its selected experts, so the gradient reaches the router through the selected experts' softmax
weights: the Switch Transformer's signal, with nothing from the unselected experts. The shared
expert's gate (a constant ``sigmoid = 1/2``, see :mod:`~densetomoe.formats.qwen_moe`) stays frozen.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ...evaluation.costs import is_sparse_block
from ...recipe import Distill


def native_routers(model: nn.Module) -> list[nn.Module]:
    """The router (``gate``) of every native sparse MoE block of ``model``."""
    return [m.gate for m in model.modules() if is_sparse_block(m)]


def frozen_gates(model: nn.Module, settings: Distill) -> set[int]:
    """The ids of the native gate parameters that do not learn: the shared experts' gates always, the
    routers unless ``gates: learn``."""
    frozen = set()
    for m in model.modules():
        if is_sparse_block(m):
            if settings.gates != "learn":
                frozen |= {id(p) for p in m.gate.parameters()}
            if hasattr(m, "shared_expert_gate"):
                frozen |= {id(p) for p in m.shared_expert_gate.parameters()}
    return frozen


def param_groups(model: nn.Module, params: list[nn.Parameter], settings: Distill) -> list[dict]:
    """The optimizer's groups over ``params``: every parameter at ``settings.lr``, but each learning
    native router at ``lr x rms(router) / rms(its experts' gate_up_proj)``. Each group carries its peak
    rate as ``peak_lr``, which the schedule scales."""
    learning = {id(p) for p in params}
    routers = {}
    for m in model.modules():
        if is_sparse_block(m) and id(m.gate.weight) in learning:
            routers[id(m.gate.weight)] = settings.lr * float(_rms(m.gate.weight) / _rms(m.experts.gate_up_proj))
    groups = [{"params": [p for p in params if id(p) not in routers], "peak_lr": settings.lr}]
    groups += [{"params": [p], "peak_lr": routers[id(p)]} for p in params if id(p) in routers]
    for group in groups:
        group["lr"] = group["peak_lr"]
    return [g for g in groups if g["params"]]


def _rms(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().pow(2).mean().sqrt().clamp_min(1e-30)


@contextmanager
def engine_routing(model: nn.Module) -> Iterator[None]:
    """Run every native router of ``model`` in float32, as llama.cpp does, whatever the autocast."""
    routers = native_routers(model)
    for gate in routers:
        gate.forward = _float32_forward.__get__(gate)  # an instance attribute: the class is left alone
    try:
        yield
    finally:
        for gate in routers:
            del gate.forward


def _float32_forward(gate: nn.Module, hidden_states: torch.Tensor):
    """transformers' top-k router (logits, top-k weights, indices), its logits in float32."""
    with torch.autocast(hidden_states.device.type, enabled=False):
        logits = F.linear(hidden_states.reshape(-1, gate.weight.shape[1]).float(), gate.weight.float())
    probs = logits.softmax(-1)
    values, chosen = probs.topk(gate.top_k, dim=-1)
    if getattr(gate, "norm_topk_prob", False):
        values = values / values.sum(-1, keepdim=True)
    return logits, values, chosen
